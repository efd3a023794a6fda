//! Helpers for the query service's tests: real Kafka and MongoDB-wire servers from the devstack, events built
//! with cqrs-events and produced with rdkafka, a tiny real HTTP server standing in for mutation's relay status.
#![allow(clippy::unwrap_used, dead_code)]

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, extract::State, routing::get};
use cqrs_events::{
    AggregateType, Envelope, EventPayload, HEADER_EVENT_ID, HEADER_EVENT_TYPE, OrderCancelled,
    OrderCreated, OrderItem, OrderUser, ProductCreated, ProductDeleted, ProductUpdated, Topics,
    UserCreated, UserDeleted, UserUpdated,
};
use cqrs_query::{Application, Ctx, QueryConfig};
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use rdkafka::{
    ClientConfig,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use serde_json::Value;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub const WAIT: Duration = Duration::from_secs(60);

/// A test's own topics, Mongo database and relay stub.
pub struct Env {
    pub config: QueryConfig,
    pub topics: Topics,
    pub relay_backlog: Arc<AtomicI64>,
    pub producer: FutureProducer,
    pub mongo: mongodb::Database,
}

pub async fn env(name: &str) -> Env {
    let t = cqrs_devstack::test_env(name).await.unwrap();
    let topics = Topics::new(t.topic_prefix.clone());
    let mut all = topics.event_topics();
    all.push(topics.dlq());
    cqrs_query::kafka::ensure_topics(&t.kafka_bootstrap, &all, 3)
        .await
        .unwrap();
    let relay_backlog = Arc::new(AtomicI64::new(0));
    let relay_port = relay_stub(relay_backlog.clone()).await;
    let mut config = QueryConfig::new(t.mongo_url.clone(), t.kafka_bootstrap.clone());
    config.mongo_db = t.mongo_db.clone();
    config.topic_prefix = t.topic_prefix.clone();
    config.mutation_url = format!("http://127.0.0.1:{relay_port}");
    config.meta_poll_ms = 200;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &t.kafka_bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "2")
        .create()
        .unwrap();
    let mongo = mongodb::Client::with_uri_str(&t.mongo_url)
        .await
        .unwrap()
        .database(&t.mongo_db);
    Env {
        config,
        topics,
        relay_backlog,
        producer,
        mongo,
    }
}

/// A real HTTP server answering `GET /relay/status` like mutation does.
async fn relay_stub(backlog: Arc<AtomicI64>) -> u16 {
    let app = Router::new()
        .route(
            "/relay/status",
            get(|State(b): State<Arc<AtomicI64>>| async move {
                let n = b.load(Ordering::SeqCst);
                Json(serde_json::json!({"backlog": n, "oldestAgeSeconds": if n > 0 { 1.5 } else { 0.0 },
                                        "leader": true, "publishedTotal": 0}))
            }),
        )
        .with_state(backlog);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await });
    port
}

/// A running query service.
pub struct Running {
    pub port: u16,
    pub ctx: Arc<Ctx>,
    pub sup: Arc<cqrs_query::rebuild::Supervisor>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: JoinHandle<()>,
    pub http: reqwest::Client,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.join)
            .await
            .expect("service stops")
            .unwrap();
    }

    /// Waits until `/sync-status` says caught up.
    pub async fn wait_caught_up(&self) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let last = self.get_json("/sync-status").await;
            if last["caughtUp"] == true {
                return last;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never caught up: {last:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn metric(&self, name: &str, label_match: &str) -> f64 {
        let mut total = 0.0;
        for fam in self.ctx.metrics.registry.gather() {
            if fam.name() != name {
                continue;
            }
            for m in fam.get_metric() {
                let labels: Vec<String> = m
                    .get_label()
                    .iter()
                    .map(|l| format!("{}={}", l.name(), l.value()))
                    .collect();
                if label_match.is_empty() || labels.iter().any(|l| l == label_match) {
                    total += m.get_counter().get_value();
                }
            }
        }
        total
    }
}

pub async fn start(config: QueryConfig) -> Running {
    let app = Application::build(config).await.unwrap();
    let port = app.port();
    let ctx = app.ctx();
    let sup = app.supervisor();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let join = tokio::spawn(async move {
        app.run_until_stopped(async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Running {
        port,
        ctx,
        sup,
        stop: Some(tx),
        join,
        http: reqwest::Client::new(),
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Env {
    pub async fn send(&self, env: &Envelope) {
        let topic = self.topics.for_aggregate(env.aggregate_type);
        let key = env.aggregate_id.to_string();
        let id = env.id.to_string();
        let value = env.to_json();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: HEADER_EVENT_TYPE,
                value: Some(env.event_type().as_str()),
            })
            .insert(Header {
                key: HEADER_EVENT_ID,
                value: Some(id.as_str()),
            });
        self.producer
            .send(
                FutureRecord::to(&topic)
                    .key(&key)
                    .payload(&value)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }

    pub async fn send_all(&self, events: &[Envelope]) {
        let futs = events.iter().map(|e| self.send(e));
        // Sequential per aggregate is what matters; send in order to keep it simple and ordered.
        for f in futs {
            f.await;
        }
    }

    pub async fn send_raw(&self, aggregate: AggregateType, key: &str, value: &[u8]) {
        let topic = self.topics.for_aggregate(aggregate);
        self.producer
            .send(
                FutureRecord::to(&topic).key(key).payload(value),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }

    /// Every document of the generation's three collections, sorted by id.
    pub async fn snapshot(&self, generation: u32) -> Vec<Document> {
        let mut out = Vec::new();
        for e in AggregateType::ALL {
            let c = self
                .mongo
                .collection::<Document>(&cqrs_query::model::collection_name(e, generation));
            let docs: Vec<Document> = c
                .find(doc! {})
                .sort(doc! {"_id": 1})
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            out.extend(docs);
        }
        out
    }
}

pub fn user_created(id: Uuid, email: &str) -> Envelope {
    Envelope::new(
        id,
        1,
        EventPayload::UserCreated(UserCreated {
            email: email.into(),
            name: Some("Ann".into()),
        }),
    )
}
pub fn user_updated(id: Uuid, v: u64, email: &str, name: &str) -> Envelope {
    Envelope::new(
        id,
        v,
        EventPayload::UserUpdated(UserUpdated {
            email: email.into(),
            name: Some(name.into()),
        }),
    )
}
pub fn user_deleted(id: Uuid, v: u64) -> Envelope {
    Envelope::new(id, v, EventPayload::UserDeleted(UserDeleted {}))
}
pub fn product_created(id: Uuid, name: &str, cents: i64) -> Envelope {
    Envelope::new(
        id,
        1,
        EventPayload::ProductCreated(ProductCreated {
            name: name.into(),
            price_cents: cents,
            description: None,
        }),
    )
}
pub fn product_updated(id: Uuid, v: u64, name: &str, cents: i64) -> Envelope {
    Envelope::new(
        id,
        v,
        EventPayload::ProductUpdated(ProductUpdated {
            name: name.into(),
            price_cents: cents,
            description: Some("updated".into()),
        }),
    )
}
pub fn product_deleted(id: Uuid, v: u64) -> Envelope {
    Envelope::new(id, v, EventPayload::ProductDeleted(ProductDeleted {}))
}
pub fn order_created(id: Uuid, user: Uuid, product: Uuid, unit: i64, qty: u32) -> Envelope {
    let line = unit * i64::from(qty);
    Envelope::new(
        id,
        1,
        EventPayload::OrderCreated(OrderCreated {
            user: OrderUser {
                id: user,
                email: "ann@example.com".into(),
                name: Some("Ann".into()),
            },
            items: vec![OrderItem {
                product_id: product,
                product_name: "Widget".into(),
                unit_price_cents: unit,
                quantity: qty,
                line_total_cents: line,
            }],
            total_cents: line,
        }),
    )
}
pub fn order_cancelled(id: Uuid, v: u64) -> Envelope {
    Envelope::new(
        id,
        v,
        EventPayload::OrderCancelled(OrderCancelled {
            reason: Some("changed mind".into()),
        }),
    )
}

/// One aggregate of each type through every event type.
pub fn every_event_type() -> (Vec<Envelope>, Uuid, Uuid, Uuid, Uuid, Uuid) {
    let (u, u2, p, p2, o) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let events = vec![
        user_created(u, "ann@example.com"),
        user_updated(u, 2, "ann@example.org", "Ann B"),
        user_created(u2, "bob@example.com"),
        user_deleted(u2, 2),
        product_created(p, "Widget", 1999),
        product_updated(p, 2, "Widget Pro", 2599),
        product_created(p2, "Gadget", 500),
        product_deleted(p2, 2),
        order_created(o, u, p, 1999, 3),
        order_cancelled(o, 2),
    ];
    (events, u, u2, p, p2, o)
}
