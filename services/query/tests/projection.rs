//! Projections against real Kafka and the MongoDB-wire server: idempotence, replays, crashes, poison events.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use cqrs_events::AggregateType;
use mongodb::bson::doc;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_type_applies_and_duplicates_change_nothing() {
    let env = env("dup-every-type").await;
    let svc = start(env.config.clone()).await;
    let (events, u, u2, p, p2, o) = every_event_type();
    env.send_all(&events).await;
    svc.wait_caught_up().await;

    let user = svc.get(&format!("/user/{u}")).await;
    assert_eq!(user.status(), 200);
    assert_eq!(user.headers()["etag"], "\"2\"");
    let user: serde_json::Value = user.json().await.unwrap();
    assert_eq!(user["email"], "ann@example.org");
    assert_eq!(user["name"], "Ann B");
    assert_eq!(user["version"], 2);
    assert!(user.get("password").is_none() && user.get("passwordHash").is_none());
    assert_eq!(svc.get(&format!("/user/{u2}")).await.status(), 404);
    let product = svc.get_json(&format!("/product/{p}")).await;
    assert_eq!(product["price"], "25.99");
    assert_eq!(product["priceCents"], 2599);
    assert_eq!(product["name"], "Widget Pro");
    assert_eq!(svc.get(&format!("/product/{p2}")).await.status(), 404);
    let order = svc.get_json(&format!("/order/{o}")).await;
    assert_eq!(order["status"], "CANCELLED");
    assert_eq!(order["totalCents"], 5997);
    assert_eq!(order["total"], "59.97");
    assert_eq!(order["user"]["id"], u.to_string());
    assert_eq!(order["items"][0]["productName"], "Widget");
    assert_eq!(order["items"][0]["unitPrice"], "19.99");
    assert_eq!(order["version"], 2);

    let before = env.snapshot(1).await;
    assert_eq!(before.len(), 5);
    // Deliver every event again, twice, in two different orders (each aggregate's order is kept per key).
    env.send_all(&events).await;
    let mut rev = events.clone();
    rev.reverse();
    env.send_all(&rev).await;
    svc.wait_caught_up().await;
    assert_eq!(
        env.snapshot(1).await,
        before,
        "duplicates changed the read models"
    );
    assert_eq!(svc.metric("cqrs_query_events_applied_total", ""), 10.0);
    assert_eq!(
        svc.metric("cqrs_query_events_skipped_total", "reason=duplicate"),
        20.0
    );
    assert_eq!(svc.metric("cqrs_query_dlq_total", ""), 0.0);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_whole_topics_from_offset_zero_changes_nothing() {
    let env = env("replay-from-zero").await;
    let svc = start(env.config.clone()).await;
    let mut events = Vec::new();
    for i in 0..20 {
        let id = Uuid::new_v4();
        events.push(product_created(id, &format!("p{i}"), 100 + i));
        events.push(product_updated(id, 2, &format!("p{i}'"), 200 + i));
        let u = Uuid::new_v4();
        events.push(user_created(u, &format!("u{i}@example.com")));
        events.push(order_created(Uuid::new_v4(), u, id, 200 + i, 2));
    }
    env.send_all(&events).await;
    svc.wait_caught_up().await;
    let before = env.snapshot(1).await;
    assert_eq!(before.len(), 60);
    svc.stop().await;

    // Point generation 1 at a brand-new consumer group: it reads all three topics from offset 0 again into
    // the existing collections.
    env.mongo
        .collection::<mongodb::bson::Document>("_meta")
        .update_one(
            doc! {"_id": "projection"},
            doc! {"$set": {"servingGroup": format!("{}.replay", env.topics.prefix())}},
        )
        .await
        .unwrap();
    let svc = start(env.config.clone()).await;
    svc.wait_caught_up().await;
    assert_eq!(env.snapshot(1).await, before);
    assert_eq!(svc.metric("cqrs_query_events_applied_total", ""), 0.0);
    assert_eq!(
        svc.metric("cqrs_query_events_skipped_total", "reason=duplicate"),
        80.0
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_write_before_commit_loses_and_doubles_nothing() {
    let env = env("crash-before-commit").await;
    // Batches of at most 5 messages, and the consumer dies after its first durable write, before committing.
    let mut cfg = env.config.clone();
    cfg.batch_size = 5;
    cfg.fault_crash_after_write = Some(1);
    let ids: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    let mut events = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        events.push(product_created(*id, &format!("p{i}"), 100));
        events.push(product_updated(*id, 2, &format!("p{i}"), 150));
        events.push(product_updated(*id, 3, &format!("p{i}"), 175));
    }
    env.send_all(&events).await;
    let crashing = start(cfg).await;
    assert!(
        wait_until(WAIT, || async {
            crashing
                .ctx
                .fault_fired
                .load(std::sync::atomic::Ordering::SeqCst)
        })
        .await
    );
    let written = env.snapshot(1).await;
    assert!(
        !written.is_empty(),
        "the first batch was written before the crash"
    );
    let applied_before_crash = crashing.metric("cqrs_query_events_applied_total", "");
    assert!(applied_before_crash >= 1.0);
    let status = crashing.get_json("/sync-status").await;
    assert_eq!(
        status["caughtUp"], false,
        "the crashed batch was never committed: {status:#}"
    );
    crashing.stop().await;

    let svc = start(env.config.clone()).await;
    svc.wait_caught_up().await;
    let docs = env.snapshot(1).await;
    assert_eq!(docs.len(), 10);
    for d in &docs {
        assert_eq!(d.get_i64("version").unwrap(), 3, "{d}");
        assert_eq!(d.get_i64("priceCents").unwrap(), 175);
    }
    // The batch written before the crash was redelivered and skipped, nothing applied twice.
    let skipped = svc.metric("cqrs_query_events_skipped_total", "reason=duplicate");
    let applied = svc.metric("cqrs_query_events_applied_total", "");
    assert!(skipped >= 1.0, "the uncommitted batch is redelivered");
    assert_eq!(
        applied + applied_before_crash,
        30.0,
        "every event applied exactly once"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_between_good_events_is_dead_lettered_and_the_partition_moves_on() {
    let env = env("poison").await;
    let mut cfg = env.config.clone();
    cfg.gap_hold_ms = 300;
    let svc = start(cfg).await;
    let p = Uuid::new_v4();
    env.send(&product_created(p, "Widget", 100)).await;
    // Same key, same partition, between two good events: garbage, an unknown type, an invalid payload.
    env.send_raw(AggregateType::Product, &p.to_string(), b"{not json")
        .await;
    let unknown = serde_json::json!({"id": Uuid::now_v7(), "type": "PRODUCT-EXPLODED", "schemaVersion": 1,
        "aggregateType": "product", "aggregateId": p, "version": 2, "occurredAt": "2026-01-01T00:00:00Z", "data": {}});
    env.send_raw(
        AggregateType::Product,
        &p.to_string(),
        unknown.to_string().as_bytes(),
    )
    .await;
    let negative = product_updated(p, 2, "Widget", -5);
    env.send(&negative).await;
    env.send(&product_updated(p, 2, "Widget", 300)).await;
    // A gap: version 4 without 3.
    let q = Uuid::new_v4();
    env.send(&product_created(q, "Gap", 100)).await;
    let gap = product_updated(q, 3, "Gap", 300);
    env.send(&gap).await;

    let mut status = svc.wait_caught_up().await;
    for proj in status["projections"].as_array().unwrap() {
        assert_eq!(proj["lagMessages"], 0);
    }
    // The DLQ count is read from the DLQ topic's watermarks, a separate metadata read from the lag's; right
    // after the topic's first messages it can still read 0 (seen once in CI), so wait for it, bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while status["dlq"]["count"] != 4 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        status = svc.get_json("/sync-status").await;
    }
    assert_eq!(status["dlq"]["count"], 4, "{status:#}");
    let prod = svc.get_json(&format!("/product/{p}")).await;
    assert_eq!(prod["priceCents"], 300);
    assert_eq!(prod["version"], 2);
    assert_eq!(svc.get_json(&format!("/product/{q}")).await["version"], 1);

    let dlq = svc.get_json("/admin/dlq?limit=10").await;
    let items = dlq["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    let reasons: Vec<&str> = items
        .iter()
        .map(|i| i["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("not a JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("unknown event type")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("negative price")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("version gap")),
        "{reasons:?}"
    );
    for i in items {
        assert_eq!(
            i["sourceTopic"],
            env.topics.for_aggregate(AggregateType::Product)
        );
        assert!(i["sourceOffset"].is_i64());
    }
    assert_eq!(svc.metric("cqrs_query_dlq_total", ""), 4.0);

    // The missing version 2 arrives; replaying the gap entry from the DLQ then applies version 3.
    env.send(&product_updated(q, 2, "Gap", 200)).await;
    svc.wait_caught_up().await;
    let gap_entry = items
        .iter()
        .find(|i| i["reason"].as_str().unwrap().starts_with("version gap"))
        .unwrap();
    let res = svc
        .http
        .post(svc.url("/admin/dlq/replay"))
        .json(&serde_json::json!({"entries": [{"partition": gap_entry["partition"], "offset": gap_entry["offset"]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["replayed"].as_array().unwrap().len(), 1);
    assert!(
        wait_until(WAIT, || async {
            svc.get_json(&format!("/product/{q}")).await["version"] == 3
        })
        .await,
        "replayed event applied"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_status_is_false_while_behind_and_true_when_idle_and_complete() {
    let env = env("sync-status").await;
    let mut events = Vec::new();
    for i in 0..12 {
        events.push(user_created(Uuid::new_v4(), &format!("u{i}@example.com")));
    }
    env.send_all(&events).await;
    // A consumer that dies after its first batch leaves the group behind: a deterministic "behind" state.
    let mut cfg = env.config.clone();
    cfg.batch_size = 2;
    cfg.fault_crash_after_write = Some(1);
    let behind = start(cfg).await;
    assert!(
        wait_until(WAIT, || async {
            behind
                .ctx
                .fault_fired
                .load(std::sync::atomic::Ordering::SeqCst)
        })
        .await
    );
    let s = behind.get_json("/sync-status").await;
    assert_eq!(s["caughtUp"], false);
    assert_eq!(s["projections"][0]["lagMessages"], 12, "{s:#}");
    assert!(s["projections"][0]["partitions"].as_array().unwrap().len() >= 9);
    behind.stop().await;

    let svc = start(env.config.clone()).await;
    let s = svc.wait_caught_up().await;
    assert_eq!(s["projections"][0]["lagMessages"], 0);
    assert_eq!(s["projections"][0]["lagSeconds"], 0.0);
    assert_eq!(s["relay"]["backlog"], 0);
    // Idle and complete stays true.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(svc.get_json("/sync-status").await["caughtUp"], true);
    // A relay backlog makes it false, and so does an unreachable relay.
    env.relay_backlog
        .store(3, std::sync::atomic::Ordering::SeqCst);
    let s = svc.get_json("/sync-status").await;
    assert_eq!(s["caughtUp"], false);
    assert_eq!(s["relay"]["backlog"], 3);
    env.relay_backlog
        .store(0, std::sync::atomic::Ordering::SeqCst);
    svc.stop().await;
    let mut cfg = env.config.clone();
    cfg.mutation_url = "http://127.0.0.1:9".into();
    let svc = start(cfg).await;
    let s = svc.get_json("/sync-status").await;
    assert_eq!(s["caughtUp"], false);
    assert_eq!(s["relay"]["reachable"], false);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_concern_error_is_a_failed_write_and_commits_no_offsets() {
    let env = env("write-concern").await;
    let events: Vec<_> = (0..5)
        .map(|i| user_created(Uuid::new_v4(), &format!("wc{i}@example.com")))
        .collect();
    env.send_all(&events).await;
    // `w: 5` cannot be satisfied by the one-node Mongo-wire server: it writes locally and answers `ok: 1` with a
    // `writeConcernError`, as a primary does that steps down while waiting for a majority.
    let mut cfg = env.config.clone();
    cfg.write_concern = "5".into();
    let svc = start(cfg).await;
    let failures = || svc.metric("cqrs_query_apply_failures_total", "kind=write_concern");
    // Whichever comes first: the batch retried (correct) or its offsets committed (the defect).
    assert!(
        wait_until(WAIT, || async {
            svc.get_json("/sync-status").await["projections"][0]["lagMessages"] == 0
                || failures() >= 3.0
        })
        .await,
        "neither retried nor committed"
    );
    let s = svc.get_json("/sync-status").await;
    assert_eq!(
        s["projections"][0]["lagMessages"], 5,
        "offsets were committed for writes whose write concern failed: {s:#}"
    );
    assert_eq!(s["caughtUp"], false);
    svc.stop().await;

    // With a write concern the server can satisfy, the same batch applies: nothing was skipped.
    let svc = start(env.config.clone()).await;
    svc.wait_caught_up().await;
    for e in &events {
        let r = svc.get(&format!("/user/{}", e.aggregate_id)).await;
        assert_eq!(r.status(), 200, "{} missing", e.aggregate_id);
    }
    assert_eq!(
        svc.metric("cqrs_query_apply_failures_total", "kind=write_concern"),
        0.0
    );
    svc.stop().await;
}

/// A relay stand-in with an outbox, shaped like mutation's relay: a row leaves the outbox only after the broker
/// acknowledged its event. `GET /relay/status` first publishes whatever the outbox holds (slowly: the relay is
/// busy while the status request is in flight) and then answers the remaining backlog, which is the schedule
/// that makes a watermark read taken before the backlog read stale.
struct OutboxRelay {
    outbox: tokio::sync::Mutex<Vec<cqrs_events::Envelope>>,
    /// Where each published event landed: (topic, partition, offset).
    landed: std::sync::Mutex<std::collections::HashMap<Uuid, (String, i32, i64)>>,
    producer: rdkafka::producer::FutureProducer,
    topics: cqrs_events::Topics,
}

async fn outbox_relay_status(
    axum::extract::State(r): axum::extract::State<std::sync::Arc<OutboxRelay>>,
) -> axum::Json<serde_json::Value> {
    use rdkafka::message::{Header, OwnedHeaders};
    let mut outbox = r.outbox.lock().await;
    if !outbox.is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for e in outbox.drain(..) {
        let topic = r.topics.for_aggregate(e.aggregate_type);
        let (key, id, value) = (e.aggregate_id.to_string(), e.id.to_string(), e.to_json());
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: cqrs_events::HEADER_EVENT_TYPE,
                value: Some(e.event_type().as_str()),
            })
            .insert(Header {
                key: cqrs_events::HEADER_EVENT_ID,
                value: Some(id.as_str()),
            });
        let delivery = r
            .producer
            .send(
                rdkafka::producer::FutureRecord::to(&topic)
                    .key(&key)
                    .payload(&value)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        let (partition, offset) = (delivery.partition, delivery.offset);
        r.landed
            .lock()
            .unwrap()
            .insert(e.aggregate_id, (topic, partition, offset));
    }
    axum::Json(
        serde_json::json!({"backlog": outbox.len(), "oldestAgeSeconds": 0.0,
                                  "leader": true, "publishedTotal": 0}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_status_never_says_caught_up_before_an_acknowledged_write_is_applied() {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    let env = env("sync-status-order").await;
    let relay = Arc::new(OutboxRelay {
        outbox: tokio::sync::Mutex::new(Vec::new()),
        landed: Mutex::new(std::collections::HashMap::new()),
        producer: env.producer.clone(),
        topics: env.topics.clone(),
    });
    let app = axum::Router::new()
        .route("/relay/status", axum::routing::get(outbox_relay_status))
        .with_state(relay.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await });
    let mut cfg = env.config.clone();
    cfg.mutation_url = format!("http://127.0.0.1:{relay_port}");
    let svc = Arc::new(start(cfg).await);

    // Acknowledged writes (in the outbox), in order.
    let acked: Arc<Mutex<Vec<Uuid>>> = Arc::new(Mutex::new(Vec::new()));
    let polls_started = Arc::new(AtomicU64::new(0));
    // Number (1-based) of the latest poll that answered caughtUp.
    let last_caught_up = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (svc, acked, relay) = (svc.clone(), acked.clone(), relay.clone());
        let (polls_started, last_caught_up, stop) =
            (polls_started.clone(), last_caught_up.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut caught_up_polls, mut checked) = (0u64, 0usize);
            while !stop.load(Ordering::SeqCst) {
                let before: Vec<Uuid> = acked.lock().unwrap().clone();
                let n = polls_started.fetch_add(1, Ordering::SeqCst) + 1;
                let s = svc.get_json("/sync-status").await;
                if s["caughtUp"] != true {
                    continue;
                }
                caught_up_polls += 1;
                let committed: std::collections::HashMap<(String, i64), i64> = s["projections"][0]
                    ["partitions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        (
                            (
                                p["topic"].as_str().unwrap().to_owned(),
                                p["partition"].as_i64().unwrap(),
                            ),
                            p["committed"].as_i64().unwrap(),
                        )
                    })
                    .collect();
                for id in &before {
                    let landed = relay.landed.lock().unwrap().get(id).cloned();
                    let Some((topic, partition, offset)) = landed else {
                        panic!("poll {n}: caughtUp while {id} was still in the outbox: {s:#}");
                    };
                    let c = committed[&(topic.clone(), i64::from(partition))];
                    assert!(
                        offset < c,
                        "poll {n}: caughtUp, but {id} ({topic}/{partition}@{offset}), acknowledged before \
                         the poll started, was not applied (committed {c}): {s:#}"
                    );
                    assert_eq!(
                        svc.get(&format!("/user/{id}")).await.status(),
                        200,
                        "poll {n}: caughtUp, but {id} is not readable"
                    );
                }
                checked += before.len();
                last_caught_up.store(n, Ordering::SeqCst);
            }
            (caught_up_polls, checked)
        })
    };

    // Writes flow in bursts; after each burst the next one waits for a poll that started afterwards and said
    // caughtUp (so the polls that race the relay's publishing are followed by checked caughtUp answers).
    let mut written = 0usize;
    for round in 0..30usize {
        {
            let mut outbox = relay.outbox.lock().await;
            for i in 0..(round % 4 + 1) {
                let id = Uuid::new_v4();
                outbox.push(user_created(id, &format!("r{round}-{i}@example.com")));
                acked.lock().unwrap().push(id);
                written += 1;
            }
        }
        let after = polls_started.load(Ordering::SeqCst);
        assert!(
            wait_until(WAIT, || async {
                poller.is_finished() || last_caught_up.load(Ordering::SeqCst) > after
            })
            .await,
            "round {round}: never caught up"
        );
        if poller.is_finished() {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let (caught_up_polls, checked) = poller.await.unwrap();
    assert!(caught_up_polls >= 30, "{caught_up_polls} caughtUp answers");
    assert!(checked >= written, "{checked} checks for {written} writes");
    Arc::try_unwrap(svc).ok().unwrap().stop().await;
}

/// `POST /admin/dlq/replay` (replay-all), optionally with `?max=`; returns (status, body).
async fn replay_all(svc: &Running, max: Option<usize>) -> (u16, serde_json::Value) {
    let url = match max {
        Some(m) => svc.url(&format!("/admin/dlq/replay?max={m}")),
        None => svc.url("/admin/dlq/replay"),
    };
    let r = svc.http.post(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn dlq_count(svc: &Running) -> i64 {
    svc.get_json("/admin/dlq?limit=1").await["count"]
        .as_i64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_replays_each_of_10000_entries_once_and_reports_partial_replays() {
    use futures::StreamExt;
    let env = env("dlq-replay-10k").await;
    let mut cfg = env.config.clone();
    cfg.gap_hold_ms = 50;
    let svc = start(cfg.clone()).await;
    // 10,000 dead letters: 9,000 that stay poison (undecodable) and 1,000 version gaps (version 2 of users whose
    // version 1 arrives later).
    let healed: Vec<Uuid> = (0..1000).map(|_| Uuid::new_v4()).collect();
    let gaps: Vec<_> = healed
        .iter()
        .map(|id| user_updated(*id, 2, &format!("{id}@example.com"), "Healed"))
        .collect();
    futures::stream::iter(0..9000)
        .for_each_concurrent(500, |i| {
            let env = &env;
            async move {
                env.send_raw(AggregateType::User, &format!("k{i}"), b"not an event")
                    .await
            }
        })
        .await;
    futures::stream::iter(&gaps)
        .for_each_concurrent(500, |e| env.send(e))
        .await;
    assert!(
        wait_until(WAIT * 2, || async { dlq_count(&svc).await == 10_000 }).await,
        "DLQ has {} entries",
        dlq_count(&svc).await
    );
    // The fix: the missing version 1 of each gapped user.
    futures::stream::iter(&healed)
        .for_each_concurrent(500, |id| {
            let env = &env;
            async move {
                env.send(&user_created(*id, &format!("{id}@example.com")))
                    .await
            }
        })
        .await;
    let users = env.mongo.collection::<mongodb::bson::Document>("users_g1");
    assert!(
        wait_until(WAIT, || async {
            users.count_documents(doc! {}).await.unwrap() == 1000
        })
        .await
    );

    svc.stop().await;

    // Replays are served by a replica without apply loops, so that nothing is dead-lettered again while they
    // run and the counts are exact.
    let mut admin_cfg = cfg.clone();
    admin_cfg.consume = false;
    let admin = start(admin_cfg.clone()).await;
    // A bounded request replays part and says so.
    let (status, body) = replay_all(&admin, Some(4000)).await;
    assert_eq!(status, 202, "{body:#}");
    assert_eq!(body["complete"], false);
    let first = body["counts"]["replayed"].as_i64().unwrap();
    assert!((1..=4000).contains(&first), "{body:#}");
    assert_eq!(body["counts"]["skipped"], 0);
    assert_eq!(
        body["counts"]["remaining"].as_i64().unwrap(),
        10_000 - first
    );
    // The cursor is durable: another process continues where this one stopped.
    admin.stop().await;
    let admin = start(admin_cfg).await;
    let mut total = first;
    let mut calls = 0;
    loop {
        calls += 1;
        assert!(calls <= 20, "replay never completed");
        let (status, body) = replay_all(&admin, None).await;
        total += body["counts"]["replayed"].as_i64().unwrap();
        assert_eq!(
            body["counts"]["remaining"].as_i64().unwrap(),
            10_000 - total,
            "{body:#}"
        );
        if status == 200 {
            assert_eq!(body["complete"], true);
            break;
        }
        assert_eq!(
            (status, &body["complete"]),
            (202, &serde_json::json!(false))
        );
    }
    assert_eq!(total, 10_000, "each entry replayed exactly once");
    // Nothing new in the DLQ: replay-all has nothing to do (it used to start over at the low watermark).
    let (status, body) = replay_all(&admin, None).await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["counts"]["replayed"], 0, "{}", body["counts"]);
    assert_eq!(dlq_count(&admin).await, 10_000);

    // Consumed again: the gaps healed, and each still-poison entry came back exactly once.
    let svc = start(cfg.clone()).await;
    assert!(
        wait_until(WAIT * 2, || async {
            users.count_documents(doc! {"version": 2}).await.unwrap() == 1000
                && dlq_count(&svc).await == 19_000
        })
        .await,
        "healed: {}, DLQ: {}",
        users.count_documents(doc! {"version": 2}).await.unwrap(),
        dlq_count(&svc).await
    );
    svc.wait_caught_up().await;
    assert_eq!(dlq_count(&svc).await, 19_000);
    let listed = svc.get_json("/admin/dlq?limit=10000").await;
    let again = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["replayedFrom"].is_string())
        .count();
    assert!(again > 0, "re-dead-lettered entries say what they repeat");
    svc.stop().await;
    // Replay-all replays only those 9,000 new entries, not the 10,000 already replayed.
    let (status, body) = replay_all(&admin, None).await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["counts"]["replayed"], 9000, "{}", body["counts"]);
    assert_eq!(body["counts"]["remaining"], 0);
    let svc = admin;
    // Bad input is a 400 and replays nothing.
    let r = svc
        .http
        .post(svc.url("/admin/dlq/replay?max=zero"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = svc
        .http
        .post(svc.url("/admin/dlq/replay"))
        .header("content-type", "application/json")
        .body(r#"{"entries": [{"partition": "x"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    svc.stop().await;
}
