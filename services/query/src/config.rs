//! Configuration of the query service (clap + environment).

use std::time::Duration;

/// Every option can be set by flag or environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct QueryConfig {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "QUERY_LISTEN", default_value = "127.0.0.1:3125")]
    pub listen: String,
    /// MongoDB URL of the read models.
    #[arg(long, env = "MONGO_URL")]
    pub mongo_url: String,
    /// MongoDB database holding the read-model collections and `_meta`.
    #[arg(long, env = "MONGO_DB", default_value = "cqrs")]
    pub mongo_db: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    pub kafka_bootstrap: String,
    /// Topic prefix: topics are `<prefix>.users|products|orders|dlq`; consumer groups `<prefix>.query.g<N>`.
    #[arg(long, env = "TOPIC_PREFIX", default_value = "cqrs")]
    pub topic_prefix: String,
    /// Base URL of the mutation service (its `GET /relay/status` feeds `/sync-status`).
    #[arg(long, env = "MUTATION_URL", default_value = "http://127.0.0.1:3124")]
    pub mutation_url: String,
    /// Projection generation to serve when `_meta` has none yet; a higher value than the one `_meta` serves
    /// starts a blue/green rebuild into that generation.
    #[arg(long, env = "PROJECTION_GENERATION", default_value_t = 1)]
    pub projection_generation: u32,
    /// Maximum number of events applied in one MongoDB bulk write.
    #[arg(long, env = "QUERY_BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// How long a batch waits for more events after its first one (ms).
    #[arg(long, env = "QUERY_BATCH_WAIT_MS", default_value_t = 10)]
    pub batch_wait_ms: u64,
    /// Default wait for `X-Min-Version` (ms).
    #[arg(long, env = "QUERY_MIN_VERSION_WAIT_MS", default_value_t = 5000)]
    pub min_version_wait_ms: u64,
    /// Maximum wait a client may ask for with `Prefer: wait=<seconds>` next to `X-Min-Version` (ms).
    #[arg(long, env = "QUERY_MIN_VERSION_WAIT_MAX_MS", default_value_t = 30000)]
    pub min_version_wait_max_ms: u64,
    /// First fallback re-read of an `X-Min-Version` wait that has not been woken (ms); it doubles after each
    /// re-read up to 8 times this. Waiters are woken as soon as this replica applies (or, with change streams,
    /// sees) their document's version; the re-read covers versions applied by other replicas.
    #[arg(long, env = "QUERY_MIN_VERSION_RECHECK_MS", default_value_t = 250)]
    pub min_version_recheck_ms: u64,
    /// Default page size of list routes.
    #[arg(long, env = "QUERY_PAGE_DEFAULT", default_value_t = 50)]
    pub page_default: u32,
    /// Maximum page size of list routes.
    #[arg(long, env = "QUERY_PAGE_MAX", default_value_t = 500)]
    pub page_max: u32,
    /// How long an event whose predecessor is missing (version gap) is held before it goes to the DLQ (ms).
    #[arg(long, env = "QUERY_GAP_HOLD_MS", default_value_t = 2000)]
    pub gap_hold_ms: u64,
    /// After a rebuild switched generations, the old generation's collections are dropped after this long (s).
    #[arg(long, env = "QUERY_REBUILD_GRACE_SECS", default_value_t = 300)]
    pub rebuild_grace_secs: u64,
    /// How often `_meta` is re-read (rebuild progress, switches made by other replicas) (ms).
    #[arg(long, env = "QUERY_META_POLL_MS", default_value_t = 500)]
    pub meta_poll_ms: u64,
    /// Create the four topics at startup if missing (development; in Kubernetes the operator creates them).
    #[arg(long, env = "QUERY_CREATE_TOPICS", default_value_t = false)]
    pub create_topics: bool,
    /// Partitions of topics created by `--create-topics`.
    #[arg(long, env = "QUERY_TOPIC_PARTITIONS", default_value_t = 3)]
    pub topic_partitions: i32,
    /// Run the apply loops. `false` makes a read-only replica (reads, streams and admin only); pair it with
    /// `--change-streams` so its live streams and `X-Min-Version` waits hear about changes.
    #[arg(long, env = "QUERY_CONSUME", default_value_t = true, action = clap::ArgAction::Set)]
    pub consume: bool,
    /// Take live notices (SSE, `X-Min-Version` wake-ups) from MongoDB change streams on the serving
    /// generation's collections, so every replica sees every change, instead of from this replica's apply loop.
    #[arg(long, env = "QUERY_CHANGE_STREAMS", default_value_t = false, action = clap::ArgAction::Set)]
    pub change_streams: bool,
    /// Static consumer-group membership (Kafka `group.instance.id`): a name that stays the same when this
    /// replica's process restarts (the operator passes the pod name). A restarted replica then gets its
    /// partitions back at once, instead of waiting out the dead process's session timeout (~10 s of stalled
    /// projection). It must be unique among running replicas. Unset = dynamic membership. Trade-off: a static
    /// member does not leave the group on shutdown, so a replica that is scaled away holds its partitions until
    /// the session timeout.
    #[arg(long, env = "QUERY_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// `w` of every read-model write: `majority` (the default), a node count, or a replica-set tag. A reply
    /// with a `writeConcernError` is a failed write: the batch is retried and its offsets are not committed.
    #[arg(long, env = "QUERY_WRITE_CONCERN", default_value = "majority")]
    pub write_concern: String,
    /// Fault injection for tests: the consumer dies after this many batches were written to MongoDB and
    /// before their offsets are committed (simulates a crash at the worst moment). Never set in production.
    #[arg(long, env = "QUERY_FAULT_CRASH_AFTER_WRITE", hide = true)]
    pub fault_crash_after_write: Option<u64>,
}

impl QueryConfig {
    /// A configuration with every default, for tests and tools.
    pub fn new(mongo_url: impl Into<String>, kafka_bootstrap: impl Into<String>) -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            mongo_url: mongo_url.into(),
            mongo_db: "cqrs".into(),
            kafka_bootstrap: kafka_bootstrap.into(),
            topic_prefix: "cqrs".into(),
            mutation_url: "http://127.0.0.1:3124".into(),
            projection_generation: 1,
            batch_size: 500,
            batch_wait_ms: 10,
            min_version_wait_ms: 5000,
            min_version_wait_max_ms: 30000,
            min_version_recheck_ms: 250,
            page_default: 50,
            page_max: 500,
            gap_hold_ms: 2000,
            rebuild_grace_secs: 300,
            meta_poll_ms: 500,
            create_topics: false,
            topic_partitions: 3,
            consume: true,
            change_streams: false,
            instance_id: None,
            write_concern: "majority".into(),
            fault_crash_after_write: None,
        }
    }

    pub fn batch_wait(&self) -> Duration {
        Duration::from_millis(self.batch_wait_ms)
    }
}
