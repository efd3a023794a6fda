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

/// Pretty JSON with every object's keys sorted, so the text does not depend on whether some other crate in the
/// build turned on serde_json's `preserve_order` (feature unification would otherwise change the key order).
fn pretty(s: &schemars::Schema) -> String {
    let mut text =
        serde_json::to_string_pretty(&canonical(s.as_value().clone())).unwrap_or_default();
    text.push('\n');
    text
}

fn canonical(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let sorted: std::collections::BTreeMap<String, serde_json::Value> =
                m.into_iter().map(|(k, v)| (k, canonical(v))).collect();
            serde_json::Value::Object(sorted.into_iter().collect())
        }
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(canonical).collect())
        }
        other => other,
    }
}
