//! The query service's error type.

use axum::response::{IntoResponse, Response};
use cqrs_common::Problem;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A write command answered `ok: 1` with a `writeConcernError`: the write is not known to be durable (it
    /// may be rolled back), so it counts as failed.
    #[error("{command} on {collection}: write concern failed: {code} {code_name}: {message}")]
    WriteConcern {
        command: String,
        collection: String,
        code: i32,
        code_name: String,
        message: String,
    },
    /// Temporarily impossible (e.g. another replica holds a drop of the generation): 503, retry later.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Other(String),
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        tracing::error!(error = %self, "request failed");
        match self {
            QueryError::Mongo(_) | QueryError::Kafka(_) | QueryError::WriteConcern { .. } => {
                Problem::unavailable(format!("a dependency is unavailable: {self}"), 1)
                    .into_response()
            }
            QueryError::Busy(m) => Problem::unavailable(m, 1).into_response(),
            _ => Problem::internal(self.to_string()).into_response(),
        }
    }
}
