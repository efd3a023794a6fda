//! Test helpers: run the application on port 0 against the devstack, talk HTTP, read the topics.
#![allow(clippy::unwrap_used, dead_code)]

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use cqrs_events::{Envelope, Topics};
use cqrs_mutation::{Application, Config};
use rdkafka::{
    ClientConfig, Message,
    consumer::{BaseConsumer, Consumer},
    message::Headers,
};
use serde_json::Value;
use tokio::task::JoinHandle;

pub struct Running {
    pub base: String,
    pub handle: JoinHandle<()>,
    pub client: reqwest::Client,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Graceful stop (drains), waiting for the application to return.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.handle).await;
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn relay_status(&self) -> Value {
        self.client
            .get(self.url("/relay/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls `/relay/status` until the outbox is empty.
    pub async fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.relay_status().await;
            if s["backlog"] == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "outbox not drained in {timeout:?}: {s}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Starts the application with `config`; it runs until `shutdown` or until the handle is aborted.
pub async fn spawn(config: Config) -> Running {
    let app = Application::build(config).await.unwrap();
    let port = app.port();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        app.run_until_stopped(async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Running {
        base: format!("http://127.0.0.1:{port}"),
        handle,
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .build()
            .unwrap(),
        stop: Some(tx),
    }
}

/// Cheap argon2 parameters so tests spend their time on what they test (production defaults are OWASP's).
pub fn fast_hashing(c: &mut Config) {
    c.argon2_memory_kib = 1024;
    c.argon2_iterations = 1;
}

pub async fn env_config(name: &str) -> (cqrs_devstack::TestEnv, Config) {
    let env = cqrs_devstack::test_env(name).await.unwrap();
    let mut c = Config::for_test(&env.pg_url, &env.kafka_bootstrap, &env.topic_prefix);
    fast_hashing(&mut c);
    (env, c)
}

/// One consumed event with its Kafka metadata.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub key: String,
    pub headers: HashMap<String, String>,
    pub raw: String,
    pub envelope: Envelope,
}

/// Reads the prefix's event topics from the beginning until `until(&all_so_far)` or the timeout.
pub fn consume_until(
    bootstrap: &str,
    prefix: &str,
    timeout: Duration,
    until: impl Fn(&[Consumed]) -> bool,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    let topics = Topics::new(prefix).event_topics();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&refs).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        if until(&out) {
            break;
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            {
                let raw = String::from_utf8(m.payload().unwrap_or_default().to_vec()).unwrap();
                let envelope = cqrs_events::decode(raw.as_bytes()).unwrap();
                let mut headers = HashMap::new();
                if let Some(h) = m.headers() {
                    for x in h.iter() {
                        headers.insert(
                            x.key.to_owned(),
                            String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                out.push(Consumed {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    headers,
                    raw,
                    envelope,
                });
            }
        }
    }
    out
}

/// Asserts per-aggregate order in the order consumed: a version is never seen before its predecessor
/// (duplicates of already seen versions are allowed: at-least-once). Returns the distinct (id, version) count.
pub fn assert_per_aggregate_order(events: &[Consumed]) -> usize {
    let mut max_seen: HashMap<uuid::Uuid, u64> = HashMap::new();
    let mut distinct = std::collections::HashSet::new();
    for e in events {
        let m = max_seen.entry(e.envelope.aggregate_id).or_insert(0);
        assert!(
            e.envelope.version <= *m + 1,
            "aggregate {} jumped from version {} to {}",
            e.envelope.aggregate_id,
            m,
            e.envelope.version
        );
        *m = (*m).max(e.envelope.version);
        distinct.insert((e.envelope.aggregate_id, e.envelope.version));
    }
    distinct.len()
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
