//! The devstack reuses running servers and cleans up what it started.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;

use cqrs_devstack::{ProfileSpec, ensure_stack, stack_state, stop_stack};

fn open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[tokio::test]
async fn a_second_start_reuses_the_servers_and_stop_removes_them() {
    let profile = format!("reuse-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let spec = ProfileSpec::test(&profile);

    let first = ensure_stack(&spec).await.unwrap();
    let mut started = first.started.clone();
    started.sort_unstable();
    assert_eq!(started, vec!["kafka", "mongo", "postgres"]);
    let s = &first.state;
    assert!(open(s.pg_port) && open(s.kafka_port) && open(s.mongo_port));

    let second = ensure_stack(&spec).await.unwrap();
    assert!(
        second.started.is_empty(),
        "second start must reuse, but started {:?}",
        second.started
    );
    assert_eq!(second.state, first.state, "same servers, same pids");

    assert!(stop_stack(&profile).await.unwrap());
    assert!(!open(s.pg_port), "postgres still listening");
    assert!(!open(s.kafka_port), "kafka still listening");
    assert!(!open(s.mongo_port), "mongo still listening");
    assert!(!s.pg_dir.exists(), "postgres files left behind");
    assert!(!s.kafka_dir.exists(), "kafka files left behind");
    assert!(!s.mongo_dir.exists(), "mongo files left behind");
    assert!(stack_state(&profile).is_none(), "state file left behind");
    // Stopping again is harmless.
    assert!(!stop_stack(&profile).await.unwrap());
}
