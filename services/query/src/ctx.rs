//! State shared by the HTTP handlers, the projectors and the rebuild supervisor.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
};

use cqrs_events::{AggregateType, Topics};
use rdkafka::{consumer::BaseConsumer, producer::FutureProducer};
use tokio::sync::broadcast;

use crate::{config::QueryConfig, error::QueryError, kafka, metrics::Metrics, store::Store};

/// A read-model change, published by the apply loop after the write is durable.
#[derive(Debug, Clone)]
pub struct Change {
    pub entity: AggregateType,
    pub id: String,
    pub version: u64,
    pub generation: u32,
    /// The document as clients see it; `None` once deleted.
    pub doc: Option<serde_json::Value>,
}

#[derive(Debug, Clone)]
pub enum Notice {
    Changed(Arc<Change>),
    /// Reads switched to this generation.
    Switched(u32),
    /// Changes may have been missed (the change stream's history was lost): readers must re-read.
    Reset(Arc<String>),
}

pub struct Ctx {
    pub config: QueryConfig,
    pub topics: Topics,
    pub store: Store,
    pub producer: FutureProducer,
    pub metrics: Metrics,
    pub notices: broadcast::Sender<Notice>,
    serving: AtomicU32,
    /// Kafka timestamp (ms) of the last applied message per (group, topic, partition): an upper bound for the
    /// lag in seconds of a partition that still has lag.
    pub last_applied_ts: Mutex<HashMap<(String, String, i32), i64>>,
    /// Inspectors (metadata/watermarks/committed offsets) per consumer group, created on first use.
    inspectors: Mutex<HashMap<String, Arc<BaseConsumer>>>,
    pub http: reqwest::Client,
    /// Batches written so far (for the fault-injection hook).
    pub batches_written: AtomicU64,
    /// Set when the fault-injection hook made a consumer die.
    pub fault_fired: AtomicBool,
    /// Test hooks of the change-stream watcher.
    pub watch_probe: crate::watch::WatchProbe,
    /// `X-Min-Version` requests waiting for a document version.
    pub waiters: crate::waiters::Waiters,
}

impl Ctx {
    pub fn new(
        config: QueryConfig,
        store: Store,
        metrics: Metrics,
        serving: u32,
    ) -> Result<Self, QueryError> {
        let producer: FutureProducer = kafka::client_config(&config.kafka_bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()?;
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(2))
            .build()
            .map_err(|e| QueryError::Config(format!("http client: {e}")))?;
        let (notices, _) = broadcast::channel(4096);
        metrics.serving_generation.set(i64::from(serving));
        Ok(Self {
            topics: Topics::new(config.topic_prefix.clone()),
            config,
            store,
            producer,
            metrics,
            notices,
            serving: AtomicU32::new(serving),
            last_applied_ts: Mutex::new(HashMap::new()),
            inspectors: Mutex::new(HashMap::new()),
            http,
            batches_written: AtomicU64::new(0),
            fault_fired: AtomicBool::new(false),
            watch_probe: crate::watch::WatchProbe::default(),
            waiters: crate::waiters::Waiters::default(),
        })
    }

    pub fn serving(&self) -> u32 {
        self.serving.load(Ordering::SeqCst)
    }

    pub fn set_serving(&self, g: u32) {
        let old = self.serving.swap(g, Ordering::SeqCst);
        self.metrics.serving_generation.set(i64::from(g));
        if old != g {
            // Waiting reads re-read from the new generation.
            self.waiters.wake_all();
            let _ = self.notices.send(Notice::Switched(g));
        }
    }

    /// A durable read-model change: wakes the `X-Min-Version` waiters of that document whose version it reaches,
    /// and tells the live streams.
    pub fn publish(&self, change: Change) {
        self.waiters
            .reached(change.entity, &change.id, change.version);
        let _ = self.notices.send(Notice::Changed(Arc::new(change)));
    }

    /// Changes may have been missed (change-stream history lost): every waiter re-reads, live streams are told.
    pub fn reset(&self, reason: String) {
        self.waiters.wake_all();
        let _ = self.notices.send(Notice::Reset(Arc::new(reason)));
    }

    pub fn inspector(&self, group: &str) -> Result<Arc<BaseConsumer>, QueryError> {
        let mut m = self
            .inspectors
            .lock()
            .map_err(|_| QueryError::Other("inspector lock poisoned".into()))?;
        if let Some(c) = m.get(group) {
            return Ok(c.clone());
        }
        let c = Arc::new(kafka::inspector(&self.config.kafka_bootstrap, group)?);
        m.insert(group.to_owned(), c.clone());
        Ok(c)
    }

    /// The consumer group of the generation a fresh database starts with.
    pub fn base_group(&self, generation: u32) -> String {
        format!("{}.query.g{generation}", self.topics.prefix())
    }
}
