//! Proof that each server of the devstack is real: round trips through the real protocols.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::HashMap, time::Duration};

use cqrs_devstack::{Kafka, test_env};
use mongodb::bson::{Document, doc};
use rdkafka::{
    ClientConfig, Message,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    consumer::{CommitMode, Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
};

#[tokio::test]
async fn postgres_round_trip_with_a_migration() {
    let env = test_env("pg-round-trip").await.unwrap();
    let pool = sqlx::PgPool::connect(&env.pg_url).await.unwrap();
    let migrator = sqlx::migrate::Migrator::new(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/migrations"
    )))
    .await
    .unwrap();
    migrator.run(&pool).await.unwrap();
    // Running it again is a no-op (the migration is recorded).
    migrator.run(&pool).await.unwrap();
    let id: i64 = sqlx::query_scalar("insert into widgets (name) values ($1) returning id")
        .bind("sprocket")
        .fetch_one(&pool)
        .await
        .unwrap();
    let name: String = sqlx::query_scalar("select name from widgets where id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(name, "sprocket");
    let dup = sqlx::query("insert into widgets (name) values ('sprocket')")
        .execute(&pool)
        .await
        .unwrap_err();
    assert_eq!(
        dup.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("23505"),
        "unique violation expected"
    );
    let version: String = sqlx::query_scalar("show server_version")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        version.starts_with("15"),
        "PostgreSQL 15 expected, got {version}"
    );
}

async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let res = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    for r in res {
        r.unwrap();
    }
}

fn consumer(bootstrap: &str, group: &str, topic: &str) -> StreamConsumer {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    c
}

/// Reads until `n` messages arrived, committing each one synchronously after it is "processed".
async fn consume(c: &StreamConsumer, n: usize, seen: &mut Vec<(String, u32)>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < n {
        let m = tokio::time::timeout_at(deadline, c.recv())
            .await
            .expect("timed out waiting for messages")
            .unwrap();
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        let seq: u32 = std::str::from_utf8(m.payload().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        seen.push((key, seq));
        c.commit_message(&m, CommitMode::Sync).unwrap();
    }
}

/// 1,000 keyed messages through an idempotent producer; a consumer group takes half, the broker restarts, a new
/// consumer of the same group resumes from the committed offsets: nothing lost, nothing read twice, and each
/// key's messages in order.
#[tokio::test]
async fn kafka_keyed_messages_survive_a_broker_restart_with_committed_offsets() {
    let mut kafka = Kafka::start_private().await.unwrap();
    let bootstrap = kafka.bootstrap();
    let topic = "devstack.proof";
    create_topic(&bootstrap, topic, 3).await;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .unwrap();
    let sends = (0..1000u32).map(|i| {
        let producer = producer.clone();
        async move {
            let key = format!("key-{}", i % 37);
            let payload = i.to_string();
            producer
                .send(
                    FutureRecord::to(topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
        }
    });
    // Sequential awaits would be slow; the idempotent producer keeps per-partition order with several in flight.
    for r in futures::future::join_all(sends).await {
        r.unwrap();
    }

    let mut seen = Vec::new();
    {
        let c = consumer(&bootstrap, "proof-group", topic);
        consume(&c, 500, &mut seen).await;
    }

    kafka.stop().await.unwrap();
    assert!(!kafka.running());
    kafka.start().await.unwrap();

    let c = consumer(&bootstrap, "proof-group", topic);
    consume(&c, 1000, &mut seen).await;
    // Nothing beyond the 1,000: a short extra poll must find nothing (committed offsets were honoured).
    let extra = tokio::time::timeout(Duration::from_secs(2), c.recv()).await;
    assert!(
        extra.is_err(),
        "a message was delivered twice after the restart"
    );

    let mut all: Vec<u32> = seen.iter().map(|(_, s)| *s).collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..1000).collect::<Vec<_>>(),
        "every message exactly once"
    );
    let mut last: HashMap<&str, u32> = HashMap::new();
    for (k, s) in &seen {
        if let Some(prev) = last.insert(k.as_str(), *s) {
            assert!(prev < *s, "key {k}: {s} after {prev}");
        }
    }
}

#[tokio::test]
async fn mongo_unique_index_rejects_a_duplicate_and_bulk_upserts_apply() {
    let env = test_env("mongo-proof").await.unwrap();
    let client = mongodb::Client::with_uri_str(&env.mongo_url).await.unwrap();
    let db = client.database(&env.mongo_db);
    common::unique_index_rejects_a_duplicate(&db).await;

    // A batched upsert through the classic `update` command (what real MongoDB and every stand-in support):
    // 100 new documents and one existing one updated, in one round trip.
    let products = db.collection::<Document>("products");
    products
        .insert_one(doc! {"_id": "p0", "n": -1})
        .await
        .unwrap();
    let batch = || -> Vec<Document> {
        (0..101)
            .map(|i| doc! {"q": {"_id": format!("p{i}")}, "u": {"$set": {"n": i}}, "upsert": true})
            .collect()
    };
    let reply = db
        .run_command(doc! {"update": "products", "updates": batch(), "ordered": false})
        .await
        .unwrap();
    assert!(
        reply.get_array("writeErrors").is_err(),
        "write errors: {:?}",
        reply.get_array("writeErrors")
    );
    assert_eq!(reply.get_array("upserted").unwrap().len(), 100);
    assert_eq!(products.count_documents(doc! {}).await.unwrap(), 101);
    let p0 = products
        .find_one(doc! {"_id": "p0"})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        p0.get_i32("n").unwrap(),
        0,
        "the existing document was updated"
    );
    // The same batch again inserts nothing: upserts are idempotent.
    let reply = db
        .run_command(doc! {"update": "products", "updates": batch()})
        .await
        .unwrap();
    assert!(
        reply
            .get_array("upserted")
            .map(|a| a.is_empty())
            .unwrap_or(true)
    );
    assert_eq!(products.count_documents(doc! {}).await.unwrap(), 101);
}
