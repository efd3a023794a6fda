//! Configuration: every option is a flag and an environment variable.

use std::collections::BTreeMap;

use clap::{ArgAction, Parser};
use cqrs_common::TelemetryArgs;

/// Topic-level configuration as a JSON object of strings, e.g. `{"retention.ms":"604800000"}`. JSON because
/// Kafka values may contain commas (`cleanup.policy=compact,delete`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicConfig(pub BTreeMap<String, String>);

fn parse_topic_config(s: &str) -> Result<TopicConfig, String> {
    if s.trim().is_empty() {
        return Ok(TopicConfig::default());
    }
    serde_json::from_str::<BTreeMap<String, String>>(s)
        .map(TopicConfig)
        .map_err(|e| {
            format!("expected a JSON object of strings such as {{\"retention.ms\":\"-1\"}}: {e}")
        })
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "mutation",
    about = "CQRS write side: commands → PostgreSQL (state + events + outbox) → relay → Kafka"
)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "MUTATION_LISTEN", default_value = "127.0.0.1:3124")]
    pub listen: String,
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    pub kafka_bootstrap: String,
    /// Topic prefix: events go to `<prefix>.users|products|orders`.
    #[arg(long, env = "TOPIC_PREFIX", default_value = "cqrs")]
    pub topic_prefix: String,
    /// Partitions of topics created at startup.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 3)]
    pub topic_partitions: i32,
    /// Replication factor of topics created at startup.
    #[arg(long, env = "TOPIC_REPLICATION", default_value_t = 1)]
    pub topic_replication: i32,
    /// Topic configuration over the defaults `retention.ms=-1`, `retention.bytes=-1` (events are kept forever:
    /// projections are rebuilt by replaying them) and `min.insync.replicas=max(TOPIC_REPLICATION−1, 1)`.
    /// Applied when creating topics and reconciled on existing ones (with `CREATE_TOPICS`).
    #[arg(long, env = "TOPIC_CONFIG", default_value = "", value_parser = parse_topic_config)]
    pub topic_config: TopicConfig,
    /// Create the event topics (and the DLQ) if they are missing, and reconcile their configuration.
    #[arg(long, env = "CREATE_TOPICS", default_value_t = true, action = ArgAction::Set)]
    pub create_topics: bool,
    /// PostgreSQL connections of the command pool (8 beat 32 on 2 cores). The relay holds one more.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: u32,
    /// Group commit: how long a batch waits for more commands, in microseconds (0 = take only what is queued).
    #[arg(long, env = "GROUP_COMMIT_WINDOW_US", default_value_t = 0)]
    pub group_commit_window_us: u64,
    /// Group commit: most commands in one transaction.
    #[arg(long, env = "GROUP_COMMIT_MAX", default_value_t = 128)]
    pub group_commit_max: usize,
    /// Group commit: transactions in flight at once (0 = pool size − 1).
    #[arg(long, env = "GROUP_COMMIT_WORKERS", default_value_t = 0)]
    pub group_commit_workers: usize,
    /// How long an Idempotency-Key is remembered, in seconds.
    #[arg(long, env = "IDEMPOTENCY_TTL_SECS", default_value_t = 86_400)]
    pub idempotency_ttl_secs: u64,
    /// Most items in one order.
    #[arg(long, env = "MAX_ORDER_ITEMS", default_value_t = 100)]
    pub max_order_items: usize,
    /// Largest accepted request body, in bytes (larger → 413).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,
    /// Run the relay (it still only publishes while it holds the advisory lock).
    #[arg(long, env = "RELAY_ENABLED", default_value_t = true, action = ArgAction::Set)]
    pub relay_enabled: bool,
    /// Events per relay round.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 500)]
    pub relay_batch_size: i64,
    /// How often a stand-by relay retries the lock, and an idle leader polls the outbox, in milliseconds.
    #[arg(long, env = "RELAY_POLL_MS", default_value_t = 500)]
    pub relay_poll_ms: u64,
    /// Cap of the relay's exponential back-off on Kafka errors, in milliseconds.
    #[arg(long, env = "RELAY_MAX_BACKOFF_MS", default_value_t = 10_000)]
    pub relay_max_backoff_ms: u64,
    /// Producer `message.timeout.ms`: how long one publish attempt may take before the batch is retried.
    #[arg(long, env = "KAFKA_MESSAGE_TIMEOUT_MS", default_value_t = 15_000)]
    pub kafka_message_timeout_ms: u64,
    /// argon2id memory cost in KiB (OWASP: 19456 with 2 iterations).
    #[arg(long, env = "ARGON2_MEMORY_KIB", default_value_t = 19_456)]
    pub argon2_memory_kib: u32,
    /// argon2id iterations.
    #[arg(long, env = "ARGON2_ITERATIONS", default_value_t = 2)]
    pub argon2_iterations: u32,
    /// The whole shutdown's budget after SIGTERM, in seconds: in-flight requests, the group-commit queue and
    /// the relay's last round share it, and the process returns within it. Keep it below the pod's
    /// `terminationGracePeriodSeconds` (the operator sets both from one place).
    #[arg(long, env = "SHUTDOWN_TIMEOUT_SECS", default_value_t = 25)]
    pub shutdown_timeout_secs: u64,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl Config {
    /// Defaults for everything but the two addresses; for tests and the benchmark.
    pub fn for_test(database_url: &str, kafka_bootstrap: &str, topic_prefix: &str) -> Self {
        let mut c = Config::parse_from(["mutation", "--database-url", database_url]);
        c.listen = "127.0.0.1:0".into();
        c.kafka_bootstrap = kafka_bootstrap.into();
        c.topic_prefix = topic_prefix.into();
        c.relay_poll_ms = 100;
        c.relay_max_backoff_ms = 1_000;
        c.kafka_message_timeout_ms = 5_000;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_config_is_a_json_object_of_strings() {
        assert_eq!(parse_topic_config(""), Ok(TopicConfig::default()));
        assert_eq!(
            parse_topic_config(r#"{"cleanup.policy":"compact,delete"}"#),
            Ok(TopicConfig(BTreeMap::from([(
                "cleanup.policy".to_owned(),
                "compact,delete".to_owned()
            )])))
        );
        assert!(parse_topic_config("retention.ms=1").is_err());
        assert!(parse_topic_config(r#"{"retention.ms":-1}"#).is_err());
    }
}
