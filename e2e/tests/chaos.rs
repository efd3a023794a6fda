//! Chaos, small: one kill -9 per component under a steady load; 0 lost, 0 duplicated.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use cqrs_e2e::{
    Stack, StackConfig,
    chaos::{self, ChaosInfra, ChaosOptions, Target},
};

async fn chaos(name: &str, targets: Vec<Target>) {
    let t = Instant::now();
    let env = cqrs_devstack::test_env(name).await.unwrap();
    // Kafka and Mongo of this test's own: they get killed. PostgreSQL is the shared one (not killed).
    let (kafka, mongo) = tokio::join!(
        cqrs_devstack::Kafka::start_private(),
        cqrs_devstack::Mongo::start_private()
    );
    let mut infra = ChaosInfra {
        kafka: kafka.unwrap(),
        mongo: mongo.unwrap(),
    };
    let mut cfg = StackConfig::from_test_env(&env).unwrap();
    cfg.kafka_bootstrap = infra.kafka.bootstrap();
    cfg.mongo_url = infra.mongo.url();
    let mut stack = Stack::start(cfg).await.unwrap();
    eprintln!("infrastructure and stack up in {:?}", t.elapsed());
    let n = targets.len();
    let opts = ChaosOptions {
        rounds: 1,
        rate: 40,
        acks_between: 30,
        targets,
    };
    let report = chaos::run(&mut stack, &mut infra, &opts).await.unwrap();
    report.print();
    assert!(
        report.acknowledged > 100,
        "too little load: {}",
        report.acknowledged
    );
    assert_eq!(report.recoveries.len(), n);
    // Static group membership: a restarted query process takes its partitions back at once rather than after
    // the dead consumer's 10 s session timeout (finding 4).
    for r in report
        .recoveries
        .iter()
        .filter(|r| r.target == Target::Query)
    {
        assert!(
            r.recovered_s < 5.0,
            "query took {:.1}s to serve a new write after kill -9",
            r.recovered_s
        );
    }
    assert_eq!(report.lost(), 0, "lost acknowledged commands");
    assert_eq!(report.duplicated(), 0, "duplicated commands");
    assert!(report.passed());
    stack.stop().await;
}

/// kill -9 of mutation (the relay holder), query and the Kafka broker; the Mongo-wire server is stopped and
/// restarted gracefully (its kill -9 case is below: it loses acknowledged writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_each_component_once_under_load_loses_and_duplicates_nothing() {
    chaos(
        "e2e-chaos",
        vec![
            Target::Mutation,
            Target::Query,
            Target::Kafka,
            Target::MongoStop,
        ],
    )
    .await;
}

/// `kill -9` of the Mongo-wire server, three times, under load: no acknowledged read-model write is lost.
/// (Found by this suite: SecantusDB acknowledged writes that a kill -9 lost, even at write concern `majority`,
/// because it does not fsync per commit by default; a real replica set journals majority writes. The devstack's
/// private Mongo-wire servers now run with `--sync-on-commit`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_mongo_wire_server_loses_nothing() {
    chaos(
        "e2e-chaos-mongo",
        vec![Target::Mongo, Target::Mongo, Target::Mongo],
    )
    .await;
}
