use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The aggregate an event belongs to. One Kafka topic per aggregate type keeps each aggregate's events in one
/// partition (key = aggregate id), hence in order. (The seed's topic per event type broke that order.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AggregateType {
    User,
    Product,
    Order,
}

impl AggregateType {
    pub const ALL: [AggregateType; 3] = [
        AggregateType::User,
        AggregateType::Product,
        AggregateType::Order,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AggregateType::User => "user",
            AggregateType::Product => "product",
            AggregateType::Order => "order",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The topic suffix: `users`, `products`, `orders`.
    pub fn plural(self) -> &'static str {
        match self {
            AggregateType::User => "users",
            AggregateType::Product => "products",
            AggregateType::Order => "orders",
        }
    }
}

impl std::fmt::Display for AggregateType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Topic names under a prefix: `<prefix>.users`, `<prefix>.products`, `<prefix>.orders`, `<prefix>.dlq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn for_aggregate(&self, aggregate: AggregateType) -> String {
        format!("{}.{}", self.prefix, aggregate.plural())
    }
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.prefix)
    }
    /// The three event topics.
    pub fn event_topics(&self) -> Vec<String> {
        AggregateType::ALL
            .iter()
            .map(|a| self.for_aggregate(*a))
            .collect()
    }
    /// Which aggregate a topic carries, if it is one of ours.
    pub fn aggregate_of(&self, topic: &str) -> Option<AggregateType> {
        AggregateType::ALL
            .into_iter()
            .find(|a| self.for_aggregate(*a) == topic)
    }
}
