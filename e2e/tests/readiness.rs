//! `/readyz` means "this pod can serve its own requests": mutation needs PostgreSQL, query needs MongoDB, the
//! gateway needs nothing but itself. Kafka is nobody's readiness: mutation's outbox absorbs an outage (the
//! events are published, in order, when Kafka is back) and query keeps serving what it has. Every dependency
//! still shows in `/readyz`'s body and in `cqrs_dependency_up`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cqrs_devstack::{Kafka, Mongo, Postgres};
use cqrs_e2e::{
    Component, Stack, StackConfig,
    verify::{Ack, check_kafka},
};
use cqrs_events::AggregateType;
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

async fn readyz(http: &reqwest::Client, stack: &Stack, c: Component) -> (u16, Value) {
    match http.get(format!("{}/readyz", stack.url(c))).send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

/// Polls until every listed component's `/readyz` answers `want` (or the bound passes: then it fails).
async fn wait_for(
    http: &reqwest::Client,
    stack: &Stack,
    comps: &[Component],
    want: u16,
    why: &str,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut seen = Vec::new();
        for c in comps {
            seen.push((c.name(), readyz(http, stack, *c).await.0));
        }
        if seen.iter().all(|(_, s)| *s == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{why}: wanted {want} from all, got {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `c`'s `/readyz` until its body reports `dep` as `status` ("ok" / "failing"); returns the HTTP status
/// of that answer.
async fn wait_dependency(
    http: &reqwest::Client,
    stack: &Stack,
    c: Component,
    dep: &str,
    status: &str,
) -> u16 {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, body) = readyz(http, stack, c).await;
        if body["dependencies"][dep]["status"] == status {
            return code;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {dep} never reported {status}; last {code} {body}",
            c.name()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn metrics(http: &reqwest::Client, stack: &Stack, c: Component) -> String {
    http.get(format!("{}/metrics", stack.url(c)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Creates `n` products through the gateway and updates each twice (`If-Match`, so versions 1..3 in order);
/// every command must succeed.
async fn write_products(stack: &Stack, n: usize, acks: &mut Vec<Ack>, why: &str) {
    let gw = &stack.gateway;
    for i in 0..n {
        let r = gw
            .post(
                "/product",
                &json!({"name": format!("{why} {i}"), "price": "2.50"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status.as_u16(), 201, "{why}: create: {}", r.text);
        let id: Uuid = r.id().unwrap().parse().unwrap();
        acks.push(Ack {
            aggregate: AggregateType::Product,
            id,
            version: 1,
        });
        for v in 1..=2u64 {
            let r = gw
                .send_json(
                    Method::PATCH,
                    &format!("/product/{id}"),
                    Some(&json!({"price": format!("{}.00", v + 2)})),
                    &[("if-match", &format!("\"{v}\""))],
                )
                .await
                .unwrap();
            assert_eq!(
                r.status.as_u16(),
                200,
                "{why}: update to v{}: {}",
                v + 1,
                r.text
            );
            acks.push(Ack {
                aggregate: AggregateType::Product,
                id,
                version: v + 1,
            });
        }
    }
}

async fn relay_backlog(http: &reqwest::Client, stack: &Stack) -> Option<i64> {
    let r = http
        .get(format!("{}/relay/status", stack.url(Component::Mutation)))
        .send()
        .await
        .ok()?;
    r.json::<Value>().await.ok()?["backlog"].as_i64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_each_pods_own_and_kafka_outages_are_absorbed() {
    let env = cqrs_devstack::test_env("e2e-readiness").await.unwrap();
    let (pg, kafka, mongo) = tokio::join!(
        Postgres::start_private(),
        Kafka::start_private(),
        Mongo::start_private()
    );
    let (mut pg, mut kafka, mut mongo) = (pg.unwrap(), kafka.unwrap(), mongo.unwrap());
    pg.create_database("cqrs").await.unwrap();
    let mut cfg = StackConfig::from_test_env(&env).unwrap();
    cfg.pg_url = pg.url("cqrs");
    cfg.kafka_bootstrap = kafka.bootstrap();
    cfg.mongo_url = mongo.url();
    let stack = Stack::start(cfg).await.unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    use Component::{Gateway, Mutation, Query};
    let mut acks = Vec::new();

    wait_for(&http, &stack, &[Mutation, Query, Gateway], 200, "all up").await;
    write_products(&stack, 3, &mut acks, "all up").await;

    // PostgreSQL: mutation cannot serve commands; query and the gateway can serve (reads, proxying).
    pg.stop().await.unwrap();
    wait_for(&http, &stack, &[Mutation], 503, "PostgreSQL stopped").await;
    assert_eq!(
        wait_dependency(&http, &stack, Gateway, "mutation", "failing").await,
        200,
        "the gateway is ready on its own"
    );
    assert_eq!(
        readyz(&http, &stack, Query).await.0,
        200,
        "query does not need PostgreSQL"
    );
    pg.start().await.unwrap();
    wait_for(
        &http,
        &stack,
        &[Mutation, Query, Gateway],
        200,
        "PostgreSQL back",
    )
    .await;

    // MongoDB: query cannot read; mutation and the gateway stay ready, and writes succeed.
    mongo.stop().await.unwrap();
    wait_for(&http, &stack, &[Query], 503, "Mongo stopped").await;
    assert_eq!(
        wait_dependency(&http, &stack, Gateway, "query", "failing").await,
        200,
        "the gateway is ready on its own"
    );
    assert_eq!(
        readyz(&http, &stack, Mutation).await.0,
        200,
        "mutation does not need Mongo"
    );
    write_products(&stack, 3, &mut acks, "Mongo down").await;
    mongo.start().await.unwrap();
    wait_for(
        &http,
        &stack,
        &[Mutation, Query, Gateway],
        200,
        "Mongo back",
    )
    .await;

    // Kafka: nobody's readiness. Mutation and query report it failing (body and gauge) and stay ready, writes
    // through the gateway keep getting their 201/200 and wait in the outbox.
    kafka.stop().await.unwrap();
    for c in [Mutation, Query] {
        assert_eq!(
            wait_dependency(&http, &stack, c, "kafka", "failing").await,
            200,
            "{}: ready without Kafka",
            c.name()
        );
    }
    let m = metrics(&http, &stack, Mutation).await;
    assert!(
        m.contains(r#"cqrs_dependency_up{dependency="kafka"} 0"#)
            && m.contains(r#"cqrs_dependency_up{dependency="postgres"} 1"#),
        "{m}"
    );
    assert_eq!(readyz(&http, &stack, Gateway).await.0, 200);
    let before = acks.len();
    write_products(&stack, 10, &mut acks, "Kafka down").await;
    let backlog = relay_backlog(&http, &stack).await.unwrap();
    assert!(
        backlog >= i64::try_from(acks.len() - before).unwrap(),
        "the Kafka-down writes wait in the outbox: backlog {backlog}"
    );
    for c in [Mutation, Query, Gateway] {
        assert_eq!(
            readyz(&http, &stack, c).await.0,
            200,
            "{} with Kafka down",
            c.name()
        );
    }

    // Kafka back: the outbox drains, and every acknowledged event is in Kafka, in version order.
    kafka.start().await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let b = relay_backlog(&http, &stack).await;
        if b == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "outbox never drained: backlog {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_dependency(&http, &stack, Mutation, "kafka", "ok").await;
    let bootstrap = kafka.bootstrap();
    let prefix = stack.config.topic_prefix.clone();
    let kafka_acks = acks.clone();
    let tally = tokio::task::spawn_blocking(move || check_kafka(&bootstrap, &prefix, &kafka_acks))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(tally.checked, acks.len() as u64);
    assert!(tally.lost == 0 && tally.out_of_order == 0, "{tally:?}");
    wait_for(
        &http,
        &stack,
        &[Mutation, Query, Gateway],
        200,
        "Kafka back",
    )
    .await;

    // Liveness never depended on any of it.
    for c in [Mutation, Query, Gateway] {
        let r = http
            .get(format!("{}/healthz", stack.url(c)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    stack.stop().await;
}
