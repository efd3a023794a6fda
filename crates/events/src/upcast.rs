//! Upcasting: turning an older `schemaVersion` of a payload into the current one before it is typed.
//!
//! Every event type is at schema version 1 today, so the chain is empty. When a payload changes shape, bump
//! [`CURRENT_SCHEMA_VERSION`] for that type and add a step `(type, from) -> data` here; old events stay
//! readable forever because decoding always runs the chain.

use serde_json::Value;

use crate::EventType;

/// The schema version new events are written with.
pub const CURRENT_SCHEMA_VERSION: u32 = 1;

/// The current schema version of one event type.
pub fn current_version(_t: EventType) -> u32 {
    CURRENT_SCHEMA_VERSION
}

/// One upcasting step: data at `from` → data at `from + 1`.
type Step = fn(Value) -> Result<Value, String>;

fn step(_t: EventType, _from: u32) -> Option<Step> {
    // No historical versions exist yet. Example of a future step:
    //   (EventType::ProductCreated, 1) => Some(|mut v| { v["currency"] = "EUR".into(); Ok(v) }),
    None
}

/// Brings `data` from `version` up to the current version of `t`.
pub fn upcast(t: EventType, version: u32, mut data: Value) -> Result<Value, String> {
    let target = current_version(t);
    if version == 0 || version > target {
        return Err(format!(
            "{t} has no schema version {version} (current is {target})"
        ));
    }
    let mut v = version;
    while v < target {
        let f = step(t, v).ok_or_else(|| format!("no upcaster for {t} from schema version {v}"))?;
        data = f(data)?;
        v += 1;
    }
    Ok(data)
}
