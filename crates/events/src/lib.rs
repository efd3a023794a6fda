//! The event contract shared by the write side, the read side and the e2e tools.
//!
//! An event travels as a JSON [`Envelope`]: identity, aggregate, per-aggregate `version`, time, tracing, and a
//! typed payload under `data`. `data` is a JSON object (never a JSON string holding JSON) and self-contained: an
//! order event carries the user's and products' details as they were when the order was placed, so the order
//! projection never waits for another projection.
//!
//! Decoding goes through [`decode`], which upcasts older `schemaVersion`s to the current one before typing the
//! payload, so events written years ago stay readable. No payload has a password or a hash, by construction:
//! the types simply have no such field.

mod envelope;
mod payload;
mod topics;
mod upcast;

pub use envelope::{
    DecodeError, Envelope, HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_SCHEMA_VERSION, decode,
};
pub use payload::{
    EventPayload, EventType, OrderCancelled, OrderCreated, OrderItem, OrderUser, ProductCreated,
    ProductDeleted, ProductUpdated, UserCreated, UserDeleted, UserUpdated,
};
pub use topics::{AggregateType, Topics};
pub use upcast::CURRENT_SCHEMA_VERSION;

pub mod schema;
