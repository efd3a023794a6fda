use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AggregateType;

/// `USER-CREATED`: a user exists. Carries no password or hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserCreated {
    pub email: String,
    pub name: Option<String>,
}

/// `USER-UPDATED`: the user's full public state after the change (not a diff), so a projection can apply it
/// without reading its previous state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserUpdated {
    pub email: String,
    pub name: Option<String>,
}

/// `USER-DELETED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserDeleted {}

/// `PRODUCT-CREATED`. Money is integer minor units (cents), never a float.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProductCreated {
    pub name: String,
    pub price_cents: i64,
    pub description: Option<String>,
}

/// `PRODUCT-UPDATED`: the product's full state after the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProductUpdated {
    pub name: String,
    pub price_cents: i64,
    pub description: Option<String>,
}

/// `PRODUCT-DELETED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProductDeleted {}

/// The ordering user's details at the time of ordering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderUser {
    pub id: Uuid,
    pub email: String,
    pub name: Option<String>,
}

/// One order line, priced on the server from the product's price at the time of ordering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderItem {
    pub product_id: Uuid,
    pub product_name: String,
    pub unit_price_cents: i64,
    pub quantity: u32,
    pub line_total_cents: i64,
}

/// `ORDER-CREATED`: self-contained (user and product details embedded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderCreated {
    pub user: OrderUser,
    pub items: Vec<OrderItem>,
    pub total_cents: i64,
}

/// `ORDER-CANCELLED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderCancelled {
    pub reason: Option<String>,
}

/// The event type names, as on the wire (the seed's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum EventType {
    #[serde(rename = "USER-CREATED")]
    UserCreated,
    #[serde(rename = "USER-UPDATED")]
    UserUpdated,
    #[serde(rename = "USER-DELETED")]
    UserDeleted,
    #[serde(rename = "PRODUCT-CREATED")]
    ProductCreated,
    #[serde(rename = "PRODUCT-UPDATED")]
    ProductUpdated,
    #[serde(rename = "PRODUCT-DELETED")]
    ProductDeleted,
    #[serde(rename = "ORDER-CREATED")]
    OrderCreated,
    #[serde(rename = "ORDER-CANCELLED")]
    OrderCancelled,
}

impl EventType {
    pub const ALL: [EventType; 8] = [
        EventType::UserCreated,
        EventType::UserUpdated,
        EventType::UserDeleted,
        EventType::ProductCreated,
        EventType::ProductUpdated,
        EventType::ProductDeleted,
        EventType::OrderCreated,
        EventType::OrderCancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::UserCreated => "USER-CREATED",
            EventType::UserUpdated => "USER-UPDATED",
            EventType::UserDeleted => "USER-DELETED",
            EventType::ProductCreated => "PRODUCT-CREATED",
            EventType::ProductUpdated => "PRODUCT-UPDATED",
            EventType::ProductDeleted => "PRODUCT-DELETED",
            EventType::OrderCreated => "ORDER-CREATED",
            EventType::OrderCancelled => "ORDER-CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    pub fn aggregate_type(self) -> AggregateType {
        match self {
            EventType::UserCreated | EventType::UserUpdated | EventType::UserDeleted => {
                AggregateType::User
            }
            EventType::ProductCreated | EventType::ProductUpdated | EventType::ProductDeleted => {
                AggregateType::Product
            }
            EventType::OrderCreated | EventType::OrderCancelled => AggregateType::Order,
        }
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed payload; on the wire it is the envelope's `type` and `data` fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum EventPayload {
    #[serde(rename = "USER-CREATED")]
    UserCreated(UserCreated),
    #[serde(rename = "USER-UPDATED")]
    UserUpdated(UserUpdated),
    #[serde(rename = "USER-DELETED")]
    UserDeleted(UserDeleted),
    #[serde(rename = "PRODUCT-CREATED")]
    ProductCreated(ProductCreated),
    #[serde(rename = "PRODUCT-UPDATED")]
    ProductUpdated(ProductUpdated),
    #[serde(rename = "PRODUCT-DELETED")]
    ProductDeleted(ProductDeleted),
    #[serde(rename = "ORDER-CREATED")]
    OrderCreated(OrderCreated),
    #[serde(rename = "ORDER-CANCELLED")]
    OrderCancelled(OrderCancelled),
}

impl EventPayload {
    pub fn event_type(&self) -> EventType {
        match self {
            EventPayload::UserCreated(_) => EventType::UserCreated,
            EventPayload::UserUpdated(_) => EventType::UserUpdated,
            EventPayload::UserDeleted(_) => EventType::UserDeleted,
            EventPayload::ProductCreated(_) => EventType::ProductCreated,
            EventPayload::ProductUpdated(_) => EventType::ProductUpdated,
            EventPayload::ProductDeleted(_) => EventType::ProductDeleted,
            EventPayload::OrderCreated(_) => EventType::OrderCreated,
            EventPayload::OrderCancelled(_) => EventType::OrderCancelled,
        }
    }
}
