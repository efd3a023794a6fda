use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{AggregateType, EventPayload, EventType, upcast};

/// Kafka header carrying the event type, so consumers and tools can route without parsing the value.
pub const HEADER_EVENT_TYPE: &str = "event-type";
pub const HEADER_EVENT_ID: &str = "event-id";
pub const HEADER_SCHEMA_VERSION: &str = "schema-version";

/// The event envelope, exactly as it is stored in PostgreSQL and published to Kafka.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// UUID v7: unique, and sortable by creation time.
    pub id: Uuid,
    pub schema_version: u32,
    pub aggregate_type: AggregateType,
    pub aggregate_id: Uuid,
    /// Per-aggregate version: 1 for the creating event, +1 per later event. Projections use it as a guard.
    pub version: u64,
    pub occurred_at: DateTime<Utc>,
    /// W3C trace id of the request that caused the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Request id of the command that caused the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// `type` and `data` on the wire.
    #[serde(flatten)]
    pub payload: EventPayload,
}

impl Envelope {
    /// A new event at the current schema version with a fresh UUID v7 id.
    pub fn new(aggregate_id: Uuid, version: u64, payload: EventPayload) -> Self {
        let aggregate_type = payload.event_type().aggregate_type();
        Self {
            id: Uuid::now_v7(),
            schema_version: upcast::current_version(payload.event_type()),
            aggregate_type,
            aggregate_id,
            version,
            occurred_at: Utc::now(),
            trace_id: None,
            causation_id: None,
            payload,
        }
    }

    pub fn event_type(&self) -> EventType {
        self.payload.event_type()
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these plain types cannot fail (no maps with non-string keys, no custom serializers).
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Why bytes could not become an [`Envelope`]. Consumers send such events to the dead-letter topic with this
/// reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a JSON event envelope: {0}")]
    Malformed(String),
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("unsupported schema version: {0}")]
    SchemaVersion(String),
    #[error("invalid {event_type} payload: {reason}")]
    InvalidPayload { event_type: String, reason: String },
    #[error("aggregate type {aggregate_type} does not match event type {event_type}")]
    AggregateMismatch {
        aggregate_type: String,
        event_type: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEnvelope {
    id: Uuid,
    #[serde(rename = "type")]
    event_type: String,
    schema_version: u32,
    aggregate_type: AggregateType,
    aggregate_id: Uuid,
    version: u64,
    occurred_at: DateTime<Utc>,
    #[serde(default)]
    trace_id: Option<String>,
    #[serde(default)]
    causation_id: Option<String>,
    data: serde_json::Value,
}

/// Decodes an envelope of any supported schema version, upcasting its payload to the current version.
pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    let raw: RawEnvelope =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let t = EventType::parse(&raw.event_type)
        .ok_or_else(|| DecodeError::UnknownType(raw.event_type.clone()))?;
    if t.aggregate_type() != raw.aggregate_type {
        return Err(DecodeError::AggregateMismatch {
            aggregate_type: raw.aggregate_type.to_string(),
            event_type: t.to_string(),
        });
    }
    if raw.version == 0 {
        return Err(DecodeError::Malformed("version must be at least 1".into()));
    }
    let data =
        upcast::upcast(t, raw.schema_version, raw.data).map_err(DecodeError::SchemaVersion)?;
    let payload: EventPayload = serde_json::from_value(
        serde_json::json!({"type": t.as_str(), "data": data}),
    )
    .map_err(|e| DecodeError::InvalidPayload {
        event_type: t.to_string(),
        reason: e.to_string(),
    })?;
    Ok(Envelope {
        id: raw.id,
        schema_version: upcast::current_version(t),
        aggregate_type: raw.aggregate_type,
        aggregate_id: raw.aggregate_id,
        version: raw.version,
        occurred_at: raw.occurred_at,
        trace_id: raw.trace_id,
        causation_id: raw.causation_id,
        payload,
    })
}
