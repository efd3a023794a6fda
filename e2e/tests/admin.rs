//! The admin API through the gateway: `/admin/*` belongs to query whatever the method, so the README's
//! `POST /admin/dlq/replay` and `POST`/`DELETE /admin/projections/rebuild` work with an admin token and have
//! their effect (before, the gateway sent every non-GET to mutation, which answered 404).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cqrs_e2e::{Resp, Stack, StackConfig};
use rdkafka::{
    ClientConfig,
    producer::{FutureProducer, FutureRecord},
};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// Polls `GET path` through the gateway until `done` holds for its body; fails with the last body at the bound.
async fn poll_until(stack: &Stack, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = stack.gateway.get(path, None).await.unwrap();
        if r.ok() && done(&r.body) {
            return r.body;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: GET {path} never got there; last {} {}",
            r.status,
            r.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_from_query(r: &Resp, what: &str, status: u16) {
    assert_eq!(r.status.as_u16(), status, "{what}: {}", r.text);
    assert!(r.body.is_object(), "{what}: not a JSON answer: {}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_work_through_the_gateway() {
    let env = cqrs_devstack::test_env("e2e-admin").await.unwrap();
    let cfg = StackConfig::from_test_env(&env).unwrap();
    let products_topic = format!("{}.products", cfg.topic_prefix);
    let stack = Stack::start(cfg).await.unwrap();
    let gw = &stack.gateway;

    // Some data, so that a rebuild has something to project.
    let mut ids = Vec::new();
    for i in 0..20 {
        let r = gw
            .post(
                "/product",
                &json!({"name": format!("p{i}"), "price": "1.00"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status.as_u16(), 201, "{}", r.text);
        ids.push(r.id().unwrap());
    }
    let last = ids.last().unwrap();
    let r = gw.get(&format!("/product/{last}"), Some(1)).await.unwrap();
    assert_eq!(r.status.as_u16(), 200, "{}", r.text);

    // A poison message on the products topic lands in the DLQ.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &stack.config.kafka_bootstrap)
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to(&products_topic)
                .key("poison")
                .payload("this is not an event"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    poll_until(&stack, "/admin/dlq", "poison dead-lettered", |b| {
        b["count"] == 1
    })
    .await;

    // POST /admin/dlq/replay: the entry goes back to its source topic, is consumed again and, still poison,
    // dead-lettered a second time.
    let r = gw.post("/admin/dlq/replay", &json!({})).await.unwrap();
    assert_from_query(&r, "POST /admin/dlq/replay", 200);
    assert_eq!(
        r.body["replayed"].as_array().unwrap().len(),
        1,
        "{}",
        r.text
    );
    assert_eq!(r.body["replayed"][0]["topic"], products_topic.as_str());
    poll_until(
        &stack,
        "/admin/dlq",
        "replayed poison dead-lettered again",
        |b| b["count"] == 2,
    )
    .await;

    // POST /admin/projections/rebuild: generation 2 is built and switched to, and serves the data.
    let r = gw
        .post("/admin/projections/rebuild", &json!({"generation": 2}))
        .await
        .unwrap();
    assert_from_query(&r, "POST /admin/projections/rebuild", 202);
    assert_eq!(r.body["rebuild"]["generation"], 2, "{}", r.text);
    let status = poll_until(&stack, "/admin/projections", "rebuild to 2 switched", |b| {
        b["serving"] == 2
    })
    .await;
    assert_eq!(status["rebuild"]["state"], "switched", "{status:#}");
    assert_eq!(gw.count("/product").await.unwrap(), 20);

    // DELETE /admin/projections/rebuild: a rebuild to 3 is cancelled; generation 2 keeps serving.
    let r = gw
        .post("/admin/projections/rebuild", &json!({"generation": 3}))
        .await
        .unwrap();
    assert_from_query(&r, "POST /admin/projections/rebuild (3)", 202);
    let r = gw
        .send_json(Method::DELETE, "/admin/projections/rebuild", None, &[])
        .await
        .unwrap();
    assert_from_query(&r, "DELETE /admin/projections/rebuild", 200);
    assert_eq!(r.body["serving"], 2, "{}", r.text);
    assert_eq!(r.body["rebuild"]["generation"], 3, "{}", r.text);
    assert_eq!(r.body["rebuild"]["state"], "cancelled", "{}", r.text);
    let r = gw.get("/admin/projections", None).await.unwrap();
    assert_eq!(r.body["serving"], 2, "{}", r.text);
    assert_eq!(r.body["rebuild"]["state"], "cancelled", "{}", r.text);

    // A writer may not do any of it.
    let writer = gw.minter().mint("e2e-writer", &["writer"], 600).unwrap();
    let r = reqwest::Client::new()
        .post(gw.url("/admin/dlq/replay"))
        .bearer_auth(writer)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    stack.stop().await;
}
