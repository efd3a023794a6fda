//! Reads: status codes, pagination, read-your-writes, live streams and blue/green rebuilds under read load.
#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashMap, time::Duration};

use common::*;
use futures::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_is_404_malformed_is_400_and_lists_paginate() {
    let env = env("reads-pages").await;
    let svc = start(env.config.clone()).await;
    let mut ids: Vec<String> = Vec::new();
    let mut events = Vec::new();
    for i in 0..7 {
        let id = Uuid::new_v4();
        ids.push(id.to_string());
        events.push(product_created(id, &format!("p{i}"), 100 * i));
    }
    // A deleted product never shows in lists.
    let gone = Uuid::new_v4();
    events.push(product_created(gone, "gone", 1));
    events.push(product_deleted(gone, 2));
    env.send_all(&events).await;
    svc.wait_caught_up().await;
    ids.sort();

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            None => "/product?limit=3".to_owned(),
            Some(c) => format!("/product?limit=3&cursor={c}"),
        };
        let page = svc.get_json(&path).await;
        pages += 1;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 10);
    }
    assert_eq!(seen, ids, "every live product exactly once, in id order");
    assert_eq!(pages, 3);
    // Default page, cap, bad input.
    let all = svc.get_json("/product").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 7);
    assert_eq!(all["limit"], 50);
    assert_eq!(svc.get_json("/product?limit=100000").await["limit"], 500);
    for bad in [
        "/product?limit=0",
        "/product?limit=abc",
        "/product?cursor=zz",
        "/product?cursor=%7B%22%24gt%22%3A%22%22%7D",
    ] {
        let r = svc.get(bad).await;
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    assert_eq!(svc.get_json("/user").await["items"], json!([]));

    for path in [
        "/user/not-a-uuid",
        "/product/%7B%22%24gt%22%3A%22%22%7D",
        "/order/123",
    ] {
        let r = svc.get(path).await;
        assert_eq!(r.status(), 400, "{path}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    for path in [
        format!("/user/{}", Uuid::new_v4()),
        format!("/order/{}", Uuid::new_v4()),
        format!("/product/{gone}"),
    ] {
        let r = svc.get(&path).await;
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    let r = svc
        .http
        .get(svc.url(&format!("/product/{}", ids[0])))
        .header("X-Min-Version", "soon")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(svc.get("/readyz").await.status(), 200);
    let metrics = svc.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("cqrs_query_read_seconds_bucket{route=\"/product/{id}\""),
        "read latency by route"
    );
    assert!(metrics.contains("cqrs_query_end_to_end_lag_seconds"));
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_waits_for_min_version_and_times_out_with_503() {
    let env = env("read-your-writes").await;
    let svc = start(env.config.clone()).await;
    let u = Uuid::new_v4();
    // The read starts before the event exists; it must wait and then see it.
    let url = svc.url(&format!("/user/{u}"));
    let http = svc.http.clone();
    let waiting = tokio::spawn(async move {
        http.get(url)
            .header("X-Min-Version", "2")
            .send()
            .await
            .unwrap()
    });
    env.send(&user_created(u, "ann@example.com")).await;
    env.send(&user_updated(u, 2, "ann@example.org", "Ann"))
        .await;
    let r = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "\"2\"");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["email"], "ann@example.org");

    // Write-then-read many times in a row: each read with X-Min-Version sees its write.
    for v in 3..=12u64 {
        env.send(&user_updated(u, v, "ann@example.org", &format!("Ann {v}")))
            .await;
        let r = svc
            .http
            .get(svc.url(&format!("/user/{u}")))
            .header("X-Min-Version", v.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["version"], v);
        assert_eq!(body["name"], format!("Ann {v}"));
    }

    // A version that never comes: bounded wait, then 503 problem+json with Retry-After.
    let started = std::time::Instant::now();
    let r = svc
        .http
        .get(svc.url(&format!("/user/{u}")))
        .header("X-Min-Version", "99")
        .header("Prefer", "wait=0.4")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    svc.stop().await;
}

/// Reads the next `event:`/`data:` pair of a server-sent event stream.
async fn next_event(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buf: &mut String,
) -> (String, Value) {
    loop {
        if let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut event = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim().to_owned();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim());
                }
            }
            if event.is_empty() && data.is_empty() {
                continue; // keep-alive comment
            }
            return (event, serde_json::from_str(&data).unwrap());
        }
        let chunk = tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_streams_deliver_read_model_changes() {
    let env = env("sse").await;
    let svc = start(env.config.clone()).await;
    let p = Uuid::new_v4();
    env.send(&product_created(p, "Widget", 100)).await;
    svc.wait_caught_up().await;

    let one = svc.get(&format!("/product/{p}/stream")).await;
    assert_eq!(one.status(), 200);
    assert!(
        one.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut one = one.bytes_stream();
    let mut buf1 = String::new();
    let all = svc.get("/stream?type=product").await;
    assert_eq!(all.status(), 200);
    let mut all = all.bytes_stream();
    let mut buf2 = String::new();
    assert_eq!(svc.get("/stream?type=nope").await.status(), 400);

    let (ev, data) = next_event(&mut one, &mut buf1).await;
    assert_eq!(ev, "snapshot");
    assert_eq!(data["version"], 1);
    assert_eq!(data["doc"]["name"], "Widget");

    let other = Uuid::new_v4();
    env.send(&product_created(other, "Other", 5)).await;
    env.send(&product_updated(p, 2, "Widget 2", 250)).await;
    env.send(&product_deleted(p, 3)).await;
    let (ev, data) = next_event(&mut one, &mut buf1).await;
    assert_eq!(ev, "change");
    assert_eq!(data["id"], p.to_string());
    assert_eq!(data["version"], 2);
    assert_eq!(data["doc"]["price"], "2.50");
    let (_, data) = next_event(&mut one, &mut buf1).await;
    assert_eq!(data["version"], 3);
    assert_eq!(data["deleted"], true);

    // The per-type stream sees both products' changes.
    let mut got: HashMap<String, u64> = HashMap::new();
    while got.get(&p.to_string()) != Some(&3) || !got.contains_key(&other.to_string()) {
        let (ev, data) = next_event(&mut all, &mut buf2).await;
        assert_eq!(ev, "change");
        assert_eq!(data["type"], "product");
        got.insert(
            data["id"].as_str().unwrap().to_owned(),
            data["version"].as_u64().unwrap(),
        );
    }
    drop(one);
    drop(all);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_while_reading_never_fails_or_goes_back_in_time() {
    let env = env("rebuild").await;
    let mut cfg = env.config.clone();
    cfg.rebuild_grace_secs = 1;
    let svc = start(cfg).await;
    let ids: Vec<Uuid> = (0..30).map(|_| Uuid::new_v4()).collect();
    let mut events = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        events.push(product_created(*id, &format!("p{i}"), 100));
        for v in 2..=4u64 {
            events.push(product_updated(*id, v, &format!("p{i}"), 100 * v as i64));
        }
    }
    env.send_all(&events).await;
    svc.wait_caught_up().await;
    assert_eq!(
        svc.get_json("/admin/projections").await,
        json!({"serving": 1, "rebuild": null})
    );

    // Readers run continuously through the rebuild and the switch.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut readers = Vec::new();
    for r in 0..3 {
        let (http, base, ids, stop) = (svc.http.clone(), svc.url(""), ids.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut last: HashMap<Uuid, u64> = HashMap::new();
            let mut reads = 0u64;
            let mut i = r;
            while !stop.is_cancelled() {
                let id = ids[i % ids.len()];
                i += 1;
                let res = http
                    .get(format!("{base}/product/{id}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 200, "read of {id} failed during the rebuild");
                let v = res.json::<Value>().await.unwrap()["version"]
                    .as_u64()
                    .unwrap();
                let prev = last.insert(id, v).unwrap_or(0);
                assert!(v >= prev && v >= 4, "{id}: version went from {prev} to {v}");
                reads += 1;
            }
            reads
        }));
    }

    let post = |g: u32| {
        svc.http
            .post(svc.url("/admin/projections/rebuild"))
            .json(&json!({"generation": g}))
            .send()
    };
    // Start a rebuild to 3, replace it by 2 (a different N replaces), then ask for 2 again (idempotent).
    assert_eq!(post(3).await.unwrap().status(), 202);
    let r = post(2).await.unwrap();
    assert_eq!(r.status(), 202);
    let again = post(2).await.unwrap();
    assert_eq!(again.status(), 202);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["rebuild"]["generation"], 2);
    let deadline = tokio::time::Instant::now() + WAIT;
    let last = loop {
        let last = svc.get_json("/admin/projections").await;
        if last["serving"] == 2 {
            break last;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rebuild never switched: {last:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(last["rebuild"]["state"], "switched");
    assert_eq!(last["rebuild"]["progress"], 1.0);
    assert_eq!(last["rebuild"]["lag"], 0);
    // Keep reading a little after the switch, then check the readers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    for r in readers {
        assert!(r.await.unwrap() > 0);
    }
    // New writes land in generation 2 and are served.
    env.send(&product_updated(ids[0], 5, "p0", 999)).await;
    let r = svc
        .http
        .get(svc.url(&format!("/product/{}", ids[0])))
        .header("X-Min-Version", "5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(env.snapshot(2).await.len(), 30);
    // Older generations are rejected; the serving one is a no-op; the old collections go after the grace period.
    assert_eq!(post(1).await.unwrap().status(), 409);
    assert_eq!(post(2).await.unwrap().status(), 202);
    assert!(
        wait_until(WAIT, || async {
            env.snapshot(1).await.is_empty() && env.snapshot(3).await.is_empty()
        })
        .await
    );

    // Cancel: a rebuild to 4 is cancelled and reads stay on 2.
    assert_eq!(post(4).await.unwrap().status(), 202);
    let r = svc
        .http
        .delete(svc.url("/admin/projections/rebuild"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["serving"], 2);
    assert_eq!(body["rebuild"]["state"], "cancelled");
    let bad = svc
        .http
        .post(svc.url("/admin/projections/rebuild"))
        .body("{}")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_resumes_after_a_restart() {
    let env = env("rebuild-resume").await;
    let mut events = Vec::new();
    for i in 0..40 {
        events.push(user_created(Uuid::new_v4(), &format!("u{i}@example.com")));
    }
    env.send_all(&events).await;
    let svc = start(env.config.clone()).await;
    svc.wait_caught_up().await;
    svc.stop().await;
    // The generation is bumped by configuration (as the operator does): the rebuild starts at startup, and
    // its state lives in `_meta`, so a restart in the middle resumes it.
    let mut cfg = env.config.clone();
    cfg.projection_generation = 2;
    cfg.batch_size = 5;
    cfg.fault_crash_after_write = Some(2);
    let first = start(cfg).await;
    assert!(
        wait_until(WAIT, || async {
            first
                .ctx
                .fault_fired
                .load(std::sync::atomic::Ordering::SeqCst)
        })
        .await
    );
    let p = first.get_json("/admin/projections").await;
    assert_eq!(p["serving"], 1);
    first.stop().await;
    let mut cfg = env.config.clone();
    cfg.projection_generation = 2;
    let second = start(cfg).await;
    assert!(
        wait_until(WAIT, || async {
            second.get_json("/admin/projections").await["serving"] == 2
        })
        .await
    );
    assert_eq!(env.snapshot(2).await.len(), 40);
    second.wait_caught_up().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_partitions_and_both_serve_read_your_writes() {
    let env = env("two-replicas").await;
    let a = start(env.config.clone()).await;
    let b = start(env.config.clone()).await;
    let ids: Vec<Uuid> = (0..12).map(|_| Uuid::new_v4()).collect();
    for round in 1..=3u64 {
        for (i, id) in ids.iter().enumerate() {
            let e = if round == 1 {
                user_created(*id, &format!("u{i}@example.com"))
            } else {
                user_updated(
                    *id,
                    round,
                    &format!("u{i}@example.com"),
                    &format!("round {round}"),
                )
            };
            env.send(&e).await;
            // Whichever replica owns the partition, a read on either one sees the write.
            for svc in [&a, &b] {
                let r = svc
                    .http
                    .get(svc.url(&format!("/user/{id}")))
                    .header("X-Min-Version", round.to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                assert_eq!(r.json::<Value>().await.unwrap()["version"], round);
            }
        }
    }
    a.wait_caught_up().await;
    let total = a.metric("cqrs_query_events_applied_total", "")
        + b.metric("cqrs_query_events_applied_total", "");
    assert!(total >= 36.0, "every event applied by one of the replicas");
    assert_eq!(env.snapshot(1).await.len(), 12);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_streams_feed_live_streams_of_a_read_only_replica() {
    let env = env("change-streams").await;
    let mut cfg = env.config.clone();
    cfg.change_streams = true;
    let writer = start(cfg.clone()).await;
    cfg.consume = false;
    let reader = start(cfg).await;
    let p = Uuid::new_v4();
    env.send(&product_created(p, "Widget", 100)).await;
    writer.wait_caught_up().await;

    let mut stream = reader
        .get(&format!("/product/{p}/stream"))
        .await
        .bytes_stream();
    let mut buf = String::new();
    let (ev, data) = next_event(&mut stream, &mut buf).await;
    assert_eq!(
        (ev.as_str(), data["version"].as_u64()),
        ("snapshot", Some(1))
    );
    env.send(&product_updated(p, 2, "Widget 2", 200)).await;
    let (ev, data) = next_event(&mut stream, &mut buf).await;
    assert_eq!(ev, "change");
    assert_eq!(data["version"], 2);
    assert_eq!(data["doc"]["name"], "Widget 2");
    let r = reader
        .http
        .get(reader.url(&format!("/product/{p}")))
        .header("X-Min-Version", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        reader.metric("cqrs_query_events_applied_total", ""),
        0.0,
        "the read-only replica applies nothing"
    );
    drop(stream);
    reader.stop().await;
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_pending_drop_never_wipes_a_restarted_rebuild() {
    use cqrs_query::rebuild::Supervisor;
    use mongodb::bson::{Document, doc};
    let env = env("drop-restart").await;
    // An event nobody consumes (a replica without apply loops): the rebuild's lag stays above 0, so it never
    // switches, and the test writes the rebuild's documents itself.
    env.send(&user_created(Uuid::new_v4(), "a@example.com"))
        .await;
    let mut cfg = env.config.clone();
    cfg.consume = false;
    let svc = start(cfg).await;
    let users_g2 = env.mongo.collection::<Document>("users_g2");
    let rebuild = |method: reqwest::Method| {
        svc.http
            .request(method, svc.url("/admin/projections/rebuild"))
            .json(&json!({"generation": 2}))
            .send()
    };
    assert_eq!(rebuild(reqwest::Method::POST).await.unwrap().status(), 202);
    let r = rebuild(reqwest::Method::DELETE).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["rebuild"]["state"],
        "cancelled"
    );

    // What a supervisor tick reads before its slow Kafka calls: generation 2's drop is pending.
    let stale = Supervisor::read_meta(&svc.ctx).await.unwrap();
    let due = stale
        .pending_drops
        .iter()
        .find(|(g, _)| *g == 2)
        .expect("drop of the cancelled generation is scheduled")
        .1;
    // Meanwhile generation 2 is started again, and its rebuild writes documents.
    let r = rebuild(reqwest::Method::POST).await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.json::<Value>().await.unwrap()["rebuild"]["state"],
        "running"
    );
    users_g2
        .insert_one(doc! {"_id": Uuid::new_v4().to_string(), "version": 1_i64})
        .await
        .unwrap();
    // The tick goes on with what it read, at a time the old drop is due.
    svc.sup.apply_drops(&stale, due).await.unwrap();
    assert_eq!(
        users_g2.count_documents(doc! {}).await.unwrap(),
        1,
        "the restarted rebuild's collections were dropped"
    );
    let meta = Supervisor::read_meta(&svc.ctx).await.unwrap();
    assert_eq!(meta.running_rebuild().map(|r| r.generation), Some(2));
    assert!(meta.pending_drops.iter().all(|(g, _)| *g != 2), "{meta:?}");
    assert!(meta.dropping.is_empty(), "{meta:?}");

    // A drop that is still wanted does happen: cancel again; once due, the collections go.
    assert_eq!(
        rebuild(reqwest::Method::DELETE).await.unwrap().status(),
        200
    );
    let meta = Supervisor::read_meta(&svc.ctx).await.unwrap();
    let due = meta.pending_drops.iter().find(|(g, _)| *g == 2).unwrap().1;
    svc.sup.apply_drops(&meta, due).await.unwrap();
    assert_eq!(users_g2.count_documents(doc! {}).await.unwrap(), 0);
    let meta = Supervisor::read_meta(&svc.ctx).await.unwrap();
    assert!(
        meta.pending_drops.is_empty() && meta.dropping.is_empty(),
        "{meta:?}"
    );
    svc.stop().await;
}

/// The `change` events of a per-type stream up to the one for `last` (exclusive), as ids; panics on any other
/// event.
async fn changes_until(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buf: &mut String,
    last: Uuid,
) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let (ev, data) = next_event(stream, buf).await;
        assert_eq!(ev, "change", "{data}");
        let id = data["id"].as_str().unwrap().to_owned();
        if id == last.to_string() {
            return seen;
        }
        seen.push(id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_change_stream_resumes_and_misses_nothing() {
    use std::sync::atomic::Ordering::SeqCst;
    let env = env("change-stream-resume").await;
    let mut cfg = env.config.clone();
    cfg.change_streams = true;
    let svc = start(cfg).await;
    let probe = &svc.ctx.watch_probe;
    assert!(wait_until(WAIT, || async { probe.opened.load(SeqCst) >= 1 }).await);
    let mut all = svc.get("/stream?type=user").await.bytes_stream();
    let mut buf = String::new();
    let first = Uuid::new_v4();
    env.send(&user_created(first, "first@example.com")).await;
    assert!(changes_until(&mut all, &mut buf, first).await.is_empty());

    // The change stream closes (as after an error the driver could not resume from) and stays closed while
    // three users are written.
    let gate = probe.gate.lock().await;
    probe.reopen.notify_one();
    assert!(wait_until(WAIT, || async { probe.closed.load(SeqCst) >= 1 }).await);
    let missed: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for (i, id) in missed.iter().enumerate() {
        env.send(&user_created(*id, &format!("m{i}@example.com")))
            .await;
    }
    for id in &missed {
        assert!(
            wait_until(WAIT, || async {
                svc.get(&format!("/user/{id}")).await.status() == 200
            })
            .await
        );
    }
    drop(gate);
    // After the reopen, every change written meanwhile arrives (in the order they were applied, which across
    // partitions is not the order they were sent) before a later one.
    let last = Uuid::new_v4();
    env.send(&user_created(last, "last@example.com")).await;
    let mut seen = changes_until(&mut all, &mut buf, last).await;
    seen.sort();
    let mut missed: Vec<String> = missed.iter().map(Uuid::to_string).collect();
    missed.sort();
    assert_eq!(seen, missed, "changes made while the stream was closed");
    assert!(probe.opened.load(SeqCst) >= 2);
    assert_eq!(probe.resets.load(SeqCst), 0);
    drop(all);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_streams_are_told_to_reset_when_the_change_history_is_gone() {
    use mongodb::bson::doc;
    use std::sync::atomic::Ordering::SeqCst;
    let env = env("change-stream-reset").await;
    // A Mongo-wire server of this test's own with a short oplog (100 entries), so that history can be lost.
    let port = cqrs_devstack::free_port().unwrap();
    let dir = std::env::temp_dir().join(format!("cqrs-query-oplog-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = std::fs::File::create(dir.join("log")).unwrap();
    let mut server = tokio::process::Command::new(
        cqrs_devstack::Installer::global()
            .mongo_exe()
            .await
            .unwrap(),
    )
    .args(["--host", "127.0.0.1", "--port", &port.to_string()])
    .args(["--storage-path", ":memory:", "--log-level", "WARNING"])
    .args(["--oplog-max-entries", "100"])
    .stdout(log.try_clone().unwrap())
    .stderr(log)
    .kill_on_drop(true)
    .spawn()
    .unwrap();
    let url = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let mongo = mongodb::Client::with_uri_str(&url).await.unwrap();
    assert!(
        wait_until(WAIT, || async {
            mongo
                .database("admin")
                .run_command(doc! {"ping": 1})
                .await
                .is_ok()
        })
        .await,
        "the private server did not start"
    );
    let mut cfg = env.config.clone();
    cfg.mongo_url = url;
    cfg.change_streams = true;
    let svc = start(cfg).await;
    let probe = &svc.ctx.watch_probe;
    assert!(wait_until(WAIT, || async { probe.opened.load(SeqCst) >= 1 }).await);
    let mut all = svc.get("/stream?type=user").await.bytes_stream();
    let mut buf = String::new();
    let first = Uuid::new_v4();
    env.send(&user_created(first, "first@example.com")).await;
    assert!(changes_until(&mut all, &mut buf, first).await.is_empty());

    // While the stream is closed, 3,000 other writes push its resume point out of the oplog.
    let gate = probe.gate.lock().await;
    probe.reopen.notify_one();
    assert!(wait_until(WAIT, || async { probe.closed.load(SeqCst) >= 1 }).await);
    let scratch = mongo
        .database(&env.config.mongo_db)
        .collection::<mongodb::bson::Document>("scratch");
    for chunk in 0..3 {
        let docs: Vec<_> = (0..1000).map(|i| doc! {"chunk": chunk, "i": i}).collect();
        scratch.insert_many(docs).await.unwrap();
    }
    drop(gate);
    // The client is told, instead of silently missing changes; then the stream goes on.
    let (ev, data) = next_event(&mut all, &mut buf).await;
    assert_eq!(ev, "reset", "{data}");
    assert!(data["reason"].as_str().unwrap().contains("286"), "{data}");
    let last = Uuid::new_v4();
    env.send(&user_created(last, "last@example.com")).await;
    assert!(changes_until(&mut all, &mut buf, last).await.is_empty());
    assert_eq!(probe.resets.load(SeqCst), 1);
    drop(all);
    svc.stop().await;
    server.kill().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_waiters_wake_only_for_their_document_and_read_once() {
    let env = env("waiters").await;
    let mut cfg = env.config.clone();
    // No fallback re-read during this test: every read it counts is the first one or a wake-up.
    cfg.min_version_recheck_ms = 600_000;
    let svc = start(cfg).await;
    let a = Uuid::new_v4();
    env.send(&user_created(a, "a@example.com")).await;
    svc.wait_caught_up().await;
    let reads = || svc.metric("cqrs_query_min_version_reads_total", "");
    assert_eq!(reads(), 0.0);

    // 20 clients wait for version 3 of user a.
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let (http, url) = (svc.http.clone(), svc.url(&format!("/user/{a}")));
            tokio::spawn(async move {
                let r = http
                    .get(url)
                    .header("X-Min-Version", "3")
                    .header("Prefer", "wait=120")
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    assert!(wait_until(WAIT, || async { reads() >= 20.0 }).await);
    assert_eq!(svc.ctx.waiters.len(), 20);

    // 300 changes of other users wake none of them and make none of them read again.
    let applied = || svc.metric("cqrs_query_events_applied_total", "");
    let others: Vec<Uuid> = (0..150).map(|_| Uuid::new_v4()).collect();
    for (i, u) in others.iter().enumerate() {
        env.send(&user_created(*u, &format!("o{i}@example.com")))
            .await;
        env.send(&user_updated(*u, 2, &format!("o{i}@example.org"), "O"))
            .await;
    }
    assert!(wait_until(WAIT, || async { applied() >= 301.0 }).await);
    assert_eq!(
        reads(),
        20.0,
        "waiters re-read on changes of other documents"
    );
    // Version 2 of user a is not enough either.
    env.send(&user_updated(a, 2, "a@example.org", "A2")).await;
    assert!(wait_until(WAIT, || async { applied() >= 302.0 }).await);
    assert_eq!(reads(), 20.0, "waiters re-read before their version");
    assert_eq!(svc.ctx.waiters.len(), 20);
    assert!(waiters.iter().all(|w| !w.is_finished()));

    // Version 3: each waiter reads once more and answers.
    env.send(&user_updated(a, 3, "a@example.net", "A3")).await;
    for w in waiters {
        let (status, body) = w.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["version"], 3);
    }
    assert_eq!(
        reads(),
        40.0,
        "each waiter read once when its version was reached"
    );
    assert!(svc.ctx.waiters.is_empty());
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_undo_a_cancelled_rebuild() {
    let env = env("cancel-sticks").await;
    // Unconsumed events keep the rebuild's lag above 0 (a replica without apply loops), so it never switches.
    env.send(&user_created(Uuid::new_v4(), "a@example.com"))
        .await;
    let mut cfg = env.config.clone();
    cfg.consume = false;
    start(cfg.clone()).await.stop().await;
    // The operator's generation bump: the configuration says 2, the database serves 1.
    cfg.projection_generation = 2;
    let svc = start(cfg.clone()).await;
    let p = svc.get_json("/admin/projections").await;
    assert_eq!(
        (p["serving"].as_u64(), p["rebuild"]["state"].as_str()),
        (Some(1), Some("running")),
        "{p}"
    );
    let r = svc
        .http
        .delete(svc.url("/admin/projections/rebuild"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    svc.stop().await;
    // The same configuration (PROJECTION_GENERATION=2) starts again: the cancel stands.
    let svc = start(cfg).await;
    let p = svc.get_json("/admin/projections").await;
    assert_eq!(p["rebuild"]["generation"], 2, "{p}");
    assert_eq!(p["rebuild"]["state"], "cancelled", "{p}");
    // An explicit request restarts it.
    let r = svc
        .http
        .post(svc.url("/admin/projections/rebuild"))
        .json(&json!({"generation": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.json::<Value>().await.unwrap()["rebuild"]["state"],
        "running"
    );
    svc.stop().await;
}
