//! The benchmark, tiny: baselines run and yield rates, a two-step ramp accepts writes, the chart renders.
#![allow(clippy::unwrap_used)]

use cqrs_e2e::{Stack, StackConfig, bench};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_smoke_produces_ratios_and_a_chart() {
    let env = cqrs_devstack::test_env("e2e-bench").await.unwrap();
    let stack = Stack::start(StackConfig::from_test_env(&env).unwrap())
        .await
        .unwrap();
    let o = bench::BenchOptions {
        rates: vec![50, 0],
        read_ratios: vec![1],
        step_secs: 2,
        max_concurrency: 8,
        pgbench_clients: vec![2],
        baseline_secs: 2,
        mongo_docs: 1_000,
        kafka_msgs: 2_000,
        ..Default::default()
    };
    let admin_url = env.pg_url.replace(&env.pg_database, "postgres");
    let r = bench::run(
        &stack.gateway,
        &admin_url,
        &env.kafka_bootstrap,
        &env.mongo_url,
        &o,
    )
    .await
    .unwrap();
    r.print();
    assert_eq!(r.steps.len(), 2);
    for s in &r.steps {
        assert!(s.writes.ok > 0 && s.writes.errors.is_empty(), "{s:?}");
        assert!(s.reads.ok > 0 && s.reads.errors.is_empty(), "{s:?}");
        assert!(s.visibility_samples > 0);
    }
    assert!(
        r.baselines.pgbench_tps.unwrap() > 0.0,
        "{}",
        r.baselines.pgbench_note
    );
    assert!(r.baselines.mongo_insert_docs_per_s.unwrap() > 0.0);
    assert!(r.baselines.kafka_produce_msgs_per_s.unwrap() > 0.0);
    assert!(r.ratio_to_pgbench.unwrap() > 0.0);
    assert!(r.series.len() >= 4, "lag sampled over time");
    assert!(
        r.series
            .iter()
            .all(|s| s.lag_messages >= 0 && s.relay_backlog >= 0),
        "sync-status failed"
    );
    let svg = r.svg();
    assert_eq!(svg.matches("<polyline").count(), 3);
    stack.stop().await;
}
