//! The seed scenario, small: every record written through the gateway and read back with read-your-writes.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cqrs_e2e::{Stack, StackConfig, seed};

/// Records of each kind (the 2,000: ~15 s warm); `CQRS_E2E_SEED_N` overrides.
fn n() -> usize {
    std::env::var("CQRS_E2E_SEED_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_writes_and_verifies_every_record() {
    let t = Instant::now();
    let env = cqrs_devstack::test_env("e2e-seed").await.unwrap();
    let stack = Stack::start(StackConfig::from_test_env(&env).unwrap())
        .await
        .unwrap();
    eprintln!("stack up in {:?}", t.elapsed());
    let n = n();
    let opts = seed::SeedOptions {
        users: n,
        products: n,
        orders: n,
        concurrency: 32,
        progress: true,
        ..Default::default()
    };
    let report = seed::run(&stack.gateway, &opts).await.unwrap();
    report.print();
    assert!(
        report.passed(),
        "seed scenario failed: {:?}",
        report.mismatch_examples
    );
    assert_eq!(report.verified, 3 * n as u64);

    // Again, smaller, read back page by page (the full-scale mode): the first run's records are on the same
    // pages and must be skipped, not counted.
    let m = n.div_ceil(4);
    let paged = seed::run(
        &stack.gateway,
        &seed::SeedOptions {
            users: m,
            products: m,
            orders: m,
            verify: seed::VerifyMode::Pages,
            ..opts
        },
    )
    .await
    .unwrap();
    paged.print();
    assert!(
        paged.passed(),
        "paged read-back failed: {:?}",
        paged.mismatch_examples
    );
    assert_eq!(paged.verified, 3 * m as u64);
    for p in paged
        .phases
        .iter()
        .filter(|p| p.phase.starts_with("verify"))
    {
        assert_eq!(p.ok, m as u64, "{}", p.phase);
    }

    // Nothing more and nothing less than what was acknowledged is listed.
    stack
        .gateway
        .wait_caught_up(Duration::from_secs(60))
        .await
        .unwrap();
    for path in ["/user", "/product", "/order"] {
        assert_eq!(
            stack.gateway.count(path).await.unwrap(),
            (n + m) as u64,
            "{path}"
        );
    }
    stack.stop().await;
}
