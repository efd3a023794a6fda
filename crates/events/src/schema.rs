//! JSON Schemas of the envelope and of every payload, generated from the Rust types (schemars) and checked in
//! under `crates/events/schemas/`. `cargo run -p cqrs-events --bin gen-schemas` rewrites them; a test fails
//! when the checked-in files drift from the types.

use schemars::schema_for;

use crate::{
    Envelope, EventType, OrderCancelled, OrderCreated, ProductCreated, ProductDeleted,
    ProductUpdated, UserCreated, UserDeleted, UserUpdated,
};

/// `(file name, pretty JSON)` for every schema.
pub fn all() -> Vec<(String, String)> {
    let mut out = vec![("envelope.json".to_owned(), pretty(&schema_for!(Envelope)))];
    for t in EventType::ALL {
        let s = match t {
            EventType::UserCreated => schema_for!(UserCreated),
            EventType::UserUpdated => schema_for!(UserUpdated),
            EventType::UserDeleted => schema_for!(UserDeleted),
            EventType::ProductCreated => schema_for!(ProductCreated),
            EventType::ProductUpdated => schema_for!(ProductUpdated),
            EventType::ProductDeleted => schema_for!(ProductDeleted),
            EventType::OrderCreated => schema_for!(OrderCreated),
            EventType::OrderCancelled => schema_for!(OrderCancelled),
        };
        out.push((format!("{}.v1.json", t.as_str()), pretty(&s)));
    }
    out
}

fn pretty(s: &schemars::Schema) -> String {
    let mut text = serde_json::to_string_pretty(s).unwrap_or_default();
    text.push('\n');
    text
}
