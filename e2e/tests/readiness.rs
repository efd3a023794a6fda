//! `/readyz` is real: each service's readiness follows its dependencies. Stopping PostgreSQL, the Mongo-wire
//! server or Kafka turns the dependent services (and the gateway, which checks both upstreams) not-ready, and
//! starting it again brings them back without a restart of the services.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cqrs_devstack::{Kafka, Mongo, Postgres};
use cqrs_e2e::{Component, Stack, StackConfig};

async fn status(http: &reqwest::Client, stack: &Stack, c: Component) -> u16 {
    match http.get(format!("{}/readyz", stack.url(c))).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
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
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut seen = Vec::new();
        for c in comps {
            seen.push((c.name(), status(http, stack, *c).await));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_postgres_kafka_and_mongo() {
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

    wait_for(&http, &stack, &[Mutation, Query, Gateway], 200, "all up").await;

    pg.stop().await.unwrap();
    wait_for(
        &http,
        &stack,
        &[Mutation, Gateway],
        503,
        "PostgreSQL stopped",
    )
    .await;
    assert_eq!(
        status(&http, &stack, Query).await,
        200,
        "query does not depend on PostgreSQL"
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

    mongo.stop().await.unwrap();
    wait_for(&http, &stack, &[Query, Gateway], 503, "Mongo stopped").await;
    assert_eq!(
        status(&http, &stack, Mutation).await,
        200,
        "mutation does not depend on Mongo"
    );
    mongo.start().await.unwrap();
    wait_for(
        &http,
        &stack,
        &[Mutation, Query, Gateway],
        200,
        "Mongo back",
    )
    .await;

    kafka.stop().await.unwrap();
    wait_for(
        &http,
        &stack,
        &[Mutation, Query, Gateway],
        503,
        "Kafka stopped",
    )
    .await;
    kafka.start().await.unwrap();
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
