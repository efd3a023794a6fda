//! The relay against real PostgreSQL and Kafka: headers and keys, a late commit with a low position, leader
//! failover, and Kafka being down while commands keep succeeding.
#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashSet, time::Duration};

use common::{Consumed, assert_per_aggregate_order, consume_until, env_config, eventually, spawn};
use cqrs_events::{
    AggregateType, EventPayload, HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_SCHEMA_VERSION, Topics,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

async fn consume(bootstrap: &str, prefix: &str, want: usize, timeout: Duration) -> Vec<Consumed> {
    let (b, p) = (bootstrap.to_owned(), prefix.to_owned());
    tokio::task::spawn_blocking(move || {
        consume_until(&b, &p, timeout, |e| {
            e.iter()
                .map(|c| (c.envelope.aggregate_id, c.envelope.version))
                .collect::<HashSet<_>>()
                .len()
                >= want
        })
    })
    .await
    .unwrap()
}

async fn all_event_keys(pool: &sqlx::PgPool) -> HashSet<(Uuid, u64)> {
    let rows: Vec<(Uuid, i64)> = sqlx::query_as("select aggregate_id, version from events")
        .fetch_all(pool)
        .await
        .unwrap();
    rows.into_iter()
        .map(|(a, v)| (a, u64::try_from(v).unwrap()))
        .collect()
}

fn distinct(events: &[Consumed]) -> HashSet<(Uuid, u64)> {
    events
        .iter()
        .map(|c| (c.envelope.aggregate_id, c.envelope.version))
        .collect()
}

#[tokio::test]
async fn events_reach_their_topics_with_keys_and_headers() {
    let (env, c) = env_config("relay-basic").await;
    let app = spawn(c).await;
    let r = app
        .post(
            "/user",
            json!({"email": "r@example.com", "password": "password123", "name": "R"}),
        )
        .await;
    let user: Value = r.json().await.unwrap();
    let r = app
        .post("/product", json!({"name": "P", "price": "4.20"}))
        .await;
    let product: Value = r.json().await.unwrap();
    let r = app
        .post(
            "/order",
            json!({"userId": user["id"], "items": [{"productId": product["id"], "quantity": 2}]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let order: Value = r.json().await.unwrap();
    let r = app
        .client
        .post(app.url(&format!("/order/{}/cancel", order["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    app.wait_drained(Duration::from_secs(30)).await;
    let status = app.relay_status().await;
    assert_eq!(status["leader"], true);
    assert_eq!(status["publishedTotal"], 4);
    assert_eq!(status["oldestAgeSeconds"], 0.0);

    let events = consume(
        &env.kafka_bootstrap,
        &env.topic_prefix,
        4,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(distinct(&events).len(), 4);
    let topics = Topics::new(&env.topic_prefix);
    for e in &events {
        assert_eq!(e.topic, topics.for_aggregate(e.envelope.aggregate_type));
        assert_eq!(e.key, e.envelope.aggregate_id.to_string());
        assert_eq!(
            e.headers[HEADER_EVENT_TYPE],
            e.envelope.event_type().as_str()
        );
        assert_eq!(e.headers[HEADER_EVENT_ID], e.envelope.id.to_string());
        assert_eq!(e.headers[HEADER_SCHEMA_VERSION], "1");
        // data is an object, not a string holding JSON.
        let v: Value = serde_json::from_str(&e.raw).unwrap();
        assert!(v["data"].is_object(), "{}", e.raw);
    }
    let created = events
        .iter()
        .find_map(|e| match &e.envelope.payload {
            EventPayload::OrderCreated(o) => Some(o.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(created.total_cents, 840);
    assert_eq!(created.user.email, "r@example.com");
    assert_eq!(created.items[0].product_name, "P");
    let cancelled = events
        .iter()
        .find(|e| e.envelope.aggregate_type == AggregateType::Order && e.envelope.version == 2);
    assert!(cancelled.is_some());
    app.shutdown().await;
}

/// A transaction that appended an event (a low position) stays open while later transactions commit and are
/// published; when it finally commits, its event is published too.
#[tokio::test]
async fn a_late_commit_with_a_low_position_is_not_skipped() {
    let (env, c) = env_config("relay-late-commit").await;
    let app = spawn(c).await;
    let pool = sqlx::PgPool::connect(&env.pg_url).await.unwrap();
    // Make sure the app is up and migrated, then open the slow transaction.
    let r = app
        .post("/product", json!({"name": "first", "price": 1}))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut slow = pool.begin().await.unwrap();
    let slow_id = Uuid::now_v7();
    let slow_position: i64 = sqlx::query_scalar(
        "WITH e AS (INSERT INTO events (event_id, aggregate_type, aggregate_id, version, type, schema_version, data, occurred_at)
                    VALUES ($1, 'product', $2, 1, 'PRODUCT-CREATED', 1, '{\"name\":\"slow\",\"priceCents\":5,\"description\":null}', now())
                    RETURNING position)
         INSERT INTO outbox (position) SELECT position FROM e RETURNING position",
    )
    .bind(Uuid::now_v7())
    .bind(slow_id)
    .fetch_one(&mut *slow)
    .await
    .unwrap();
    // Later commands commit and are published while the slow one is still open.
    for i in 0..20 {
        let r = app
            .post(
                "/product",
                json!({"name": format!("later {i}"), "price": 1}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let later_positions: Vec<i64> =
        sqlx::query_scalar("select position from events where aggregate_id <> $1")
            .bind(slow_id)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        later_positions
            .iter()
            .filter(|p| **p > slow_position)
            .count()
            >= 20,
        "the slow transaction holds the lower position"
    );
    eventually(
        Duration::from_secs(30),
        "later events published",
        || async {
            let s = app.relay_status().await;
            (s["publishedTotal"].as_u64() == Some(21) && s["backlog"] == 0).then_some(())
        },
    )
    .await;
    let before = consume(
        &env.kafka_bootstrap,
        &env.topic_prefix,
        21,
        Duration::from_secs(30),
    )
    .await;
    assert!(before.iter().all(|e| e.envelope.aggregate_id != slow_id));
    // Commit the slow one: it is published.
    slow.commit().await.unwrap();
    let after = consume(
        &env.kafka_bootstrap,
        &env.topic_prefix,
        22,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        after.iter().any(|e| e.envelope.aggregate_id == slow_id),
        "the late commit was skipped"
    );
    assert_eq!(distinct(&after).len(), 22);
    app.wait_drained(Duration::from_secs(10)).await;
    app.shutdown().await;
}

/// Two replicas on one database: exactly one leads; abort it mid-stream and the other takes over. A consumer
/// sees every event at least once, each aggregate in version order.
#[tokio::test]
async fn the_standby_takes_over_when_the_leader_dies() {
    let (env, mut c) = env_config("relay-failover").await;
    c.relay_batch_size = 50;
    let a = spawn(c.clone()).await;
    let b = spawn(c).await;
    let a_leads = eventually(Duration::from_secs(20), "exactly one leader", || async {
        let (sa, sb) = (a.relay_status().await, b.relay_status().await);
        match (sa["leader"].as_bool(), sb["leader"].as_bool()) {
            (Some(true), Some(false)) => Some(true),
            (Some(false), Some(true)) => Some(false),
            _ => None,
        }
    })
    .await;
    let (leader, standby) = if a_leads { (a, b) } else { (b, a) };
    // Writes go through the stand-by (the leader is about to die).
    let mut ids = Vec::new();
    for i in 0..100 {
        let r = standby
            .post("/product", json!({"name": format!("p{i}"), "price": 1}))
            .await;
        ids.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let writer = {
        let client = standby.client.clone();
        let base = standby.base.clone();
        let ids = ids.clone();
        tokio::spawn(async move {
            for round in 0..8 {
                let futs = ids.iter().map(|id| {
                    client
                        .patch(format!("{base}/product/{id}"))
                        .json(&json!({"price": round + 2}))
                        .send()
                });
                for r in futures::future::join_all(futs).await {
                    assert_eq!(r.unwrap().status(), StatusCode::OK);
                }
            }
        })
    };
    // Let the leader publish part of the stream, then kill it.
    eventually(Duration::from_secs(30), "the leader publishing", || async {
        let s = leader.relay_status().await;
        (s["publishedTotal"].as_u64().unwrap_or(0) >= 150).then_some(())
    })
    .await;
    leader.handle.abort();
    eventually(
        Duration::from_secs(30),
        "the stand-by taking over",
        || async { (standby.relay_status().await["leader"] == true).then_some(()) },
    )
    .await;
    writer.await.unwrap();
    standby.wait_drained(Duration::from_secs(60)).await;
    let pool = sqlx::PgPool::connect(&env.pg_url).await.unwrap();
    let expected = all_event_keys(&pool).await;
    assert_eq!(expected.len(), 900);
    let events = consume(
        &env.kafka_bootstrap,
        &env.topic_prefix,
        expected.len(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(distinct(&events), expected, "every event at least once");
    assert_per_aggregate_order(&events);
    assert!(
        standby.relay_status().await["publishedTotal"]
            .as_u64()
            .unwrap()
            > 0
    );
    standby.shutdown().await;
}

/// With Kafka down, commands keep succeeding and the events wait in the outbox; once Kafka is back they are
/// all published, each aggregate in order.
#[tokio::test]
async fn kafka_down_commands_succeed_and_events_arrive_later() {
    let mut kafka = cqrs_devstack::Kafka::start_private().await.unwrap();
    kafka.stop().await.unwrap();
    let env = cqrs_devstack::test_env("relay-kafka-down").await.unwrap();
    let mut c = cqrs_mutation::Config::for_test(&env.pg_url, &kafka.bootstrap(), &env.topic_prefix);
    common::fast_hashing(&mut c);
    let app = spawn(c.clone()).await;
    // 1,000 products created, then 4 updates each: 5,000 commands, versions 1..=5 per aggregate.
    let client = app.client.clone();
    let creates = futures::future::join_all((0..1000).map(|i| {
        let client = client.clone();
        let url = app.url("/product");
        async move {
            let r = client
                .post(url)
                .json(&json!({"name": format!("k{i}"), "price": "1.00"}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    }))
    .await;
    for round in 2..=5 {
        let futs = creates.iter().map(|id| {
            client
                .patch(app.url(&format!("/product/{id}")))
                .header("if-match", format!("\"{}\"", round - 1))
                .json(&json!({"price": round}))
                .send()
        });
        for r in futures::future::join_all(futs).await {
            assert_eq!(r.unwrap().status(), StatusCode::OK);
        }
    }
    let status = app.relay_status().await;
    assert_eq!(status["backlog"], 5000, "{status}");
    assert!(status["oldestAgeSeconds"].as_f64().unwrap() > 0.0);
    assert_eq!(status["publishedTotal"], 0);
    // The relay is failing (and keeping every event) before Kafka comes back.
    eventually(
        Duration::from_secs(60),
        "a relay error while Kafka is down",
        || async {
            let metrics = app
                .client
                .get(app.url("/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let errors = metrics
                .lines()
                .find(|l| l.starts_with("cqrs_mutation_relay_errors_total"))?
                .to_owned();
            (errors.rsplit(' ').next()? != "0").then_some(())
        },
    )
    .await;
    assert_eq!(app.relay_status().await["backlog"], 5000);
    // Restart the service: the backlog is in the database, the new process resumes it.
    app.shutdown().await;
    let app = spawn(c).await;
    kafka.start().await.unwrap();
    app.wait_drained(Duration::from_secs(120)).await;
    let events = consume(
        &kafka.bootstrap(),
        &env.topic_prefix,
        5000,
        Duration::from_secs(60),
    )
    .await;
    let d = distinct(&events);
    assert_eq!(d.len(), 5000);
    for id in &creates {
        let id = Uuid::parse_str(id).unwrap();
        assert!((1..=5).all(|v| d.contains(&(id, v))));
    }
    assert_per_aggregate_order(&events);
    app.shutdown().await;
    kafka.stop().await.unwrap();
}

/// Each topic's configuration as the broker reports it: name → (value, set on the topic itself).
async fn topic_settings(
    admin: &rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
    topic: &str,
) -> Option<std::collections::HashMap<String, (Option<String>, bool)>> {
    use rdkafka::admin::{AdminOptions, ConfigSource, ResourceSpecifier};
    let spec = [ResourceSpecifier::Topic(topic)];
    let r = admin
        .describe_configs(spec.iter(), &AdminOptions::new())
        .await
        .ok()?;
    let resource = r.into_iter().next()?.ok()?;
    Some(
        resource
            .entries
            .into_iter()
            .map(|e| (e.name, (e.value, e.source == ConfigSource::DynamicTopic)))
            .collect(),
    )
}

/// `direct` topic mode: mutation creates its topics with retention forever and min.insync.replicas from the
/// replication factor, set on the topic itself (not inherited from the broker's defaults), and brings an
/// existing topic to that configuration while keeping its other settings; a changed TOPIC_CONFIG is reconciled.
#[tokio::test]
async fn created_topics_keep_events_forever_and_existing_ones_are_reconciled() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let (env, c) = env_config("relay-topic-config").await;
    let topics = Topics::new(env.topic_prefix.clone());
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.kafka_bootstrap)
        .create()
        .unwrap();
    // One topic exists already, created with a short retention and a setting of its own.
    let orders = topics.for_aggregate(AggregateType::Order);
    let pre = NewTopic::new(&orders, 3, TopicReplication::Fixed(1))
        .set("retention.ms", "3600000")
        .set("max.message.bytes", "2000000");
    for r in admin
        .create_topics([&pre], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    let mut all = topics.event_topics();
    all.push(topics.dlq());

    let app = spawn(c.clone()).await;
    for t in &all {
        let got = eventually(
            Duration::from_secs(30),
            &format!("{t} configured"),
            || async {
                let s = topic_settings(&admin, t).await?;
                let set = |k: &str, v: &str| s.get(k) == Some(&(Some(v.to_owned()), true));
                (set("retention.ms", "-1")
                    && set("retention.bytes", "-1")
                    && set("min.insync.replicas", "1"))
                .then_some(s)
            },
        )
        .await;
        if *t == orders {
            assert_eq!(
                got["max.message.bytes"],
                (Some("2000000".to_owned()), true),
                "the existing topic keeps its own settings"
            );
        }
    }
    app.shutdown().await;

    // TOPIC_CONFIG changed: the existing topics follow, the rest stays.
    let mut c2 = c;
    c2.topic_config = cqrs_mutation::config::TopicConfig(std::collections::BTreeMap::from([(
        "retention.ms".to_owned(),
        "86400000".to_owned(),
    )]));
    let app = spawn(c2).await;
    for t in &all {
        eventually(
            Duration::from_secs(30),
            &format!("{t} reconciled"),
            || async {
                let s = topic_settings(&admin, t).await?;
                let set = |k: &str, v: &str| s.get(k) == Some(&(Some(v.to_owned()), true));
                (set("retention.ms", "86400000") && set("retention.bytes", "-1")).then_some(())
            },
        )
        .await;
    }
    let s = topic_settings(&admin, &orders).await.unwrap();
    assert_eq!(s["max.message.bytes"], (Some("2000000".to_owned()), true));
    app.shutdown().await;
}
