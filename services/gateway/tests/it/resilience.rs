use std::time::{Duration, Instant};

use axum::http::StatusCode;

use crate::common::*;

#[tokio::test]
async fn slow_upstreams_get_504_per_route_and_writes_are_not_retried() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut cfg = config(&m, &q);
    cfg.read_timeout = Duration::from_millis(200);
    cfg.write_timeout = Duration::from_millis(400);
    let gw = spawn_gateway(cfg).await;
    let c = http();

    let started = Instant::now();
    let res = c
        .get(gw.url("/slow"))
        .header("authorization", bearer(&["reader"]))
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let body = json_body(res).await;
    assert_eq!(body["type"], "urn:cqrs:problem:upstream-timeout");

    let started = Instant::now();
    let res = c
        .post(gw.url("/slow"))
        .header("authorization", bearer(&["writer"]))
        .send()
        .await
        .expect("post");
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "the write route has its own, longer timeout"
    );
    assert_eq!(m.seen.hits(), 1, "a timed-out write is not retried");
    assert_eq!(
        gw.metric("cqrs_gateway_upstream_errors_total", &[("kind", "timeout")]),
        2.0
    );
}

#[tokio::test]
async fn a_response_body_that_never_ends_is_cut_at_the_deadline() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut cfg = config(&m, &q);
    cfg.read_timeout = Duration::from_millis(300);
    let gw = spawn_gateway(cfg).await;
    let res = http()
        .get(gw.url("/hang-body"))
        .header("authorization", bearer(&["reader"]))
        .send()
        .await
        .expect("get");
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "the head was already on its way"
    );
    let body = tokio::time::timeout(PATIENCE, res.bytes())
        .await
        .expect("body ends");
    assert!(
        body.is_err(),
        "the truncated body is an error for the client, not a silent short read"
    );
    assert_eq!(
        gw.metric(
            "cqrs_gateway_upstream_errors_total",
            &[("kind", "body_timeout")]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_small_body_that_stalls_is_answered_504_not_cut() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut cfg = config(&m, &q);
    cfg.read_timeout = Duration::from_millis(300);
    let gw = spawn_gateway(cfg).await;
    let res = http()
        .get(gw.url("/stall-small"))
        .header("authorization", bearer(&["reader"]))
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        json_body(res).await["type"],
        "urn:cqrs:problem:upstream-timeout"
    );
}

#[tokio::test]
async fn an_upstream_killed_mid_request_gives_502_then_503_and_the_gateway_recovers() {
    let (mut m, mut q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let gw = spawn_gateway(config(&m, &q)).await;
    let c = http();
    let reader = bearer(&["reader"]);

    // Warm the pool so a pooled keep-alive connection exists when the upstream dies.
    assert_eq!(
        c.get(gw.url("/product/1"))
            .header("authorization", &reader)
            .send()
            .await
            .expect("get")
            .status(),
        StatusCode::OK
    );

    let pending = tokio::spawn(
        c.get(gw.url("/killme"))
            .header("authorization", &reader)
            .send(),
    );
    q.seen.wait_parked(1).await;
    q.kill();
    let res = tokio::time::timeout(PATIENCE, pending)
        .await
        .expect("no hang")
        .expect("task")
        .expect("response");
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(json_body(res).await["type"], "urn:cqrs:problem:bad-gateway");

    // Down: connection refused → 503 with Retry-After, after exactly one retry.
    let res = c
        .get(gw.url("/product/1"))
        .header("authorization", &reader)
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(
        json_body(res).await["type"],
        "urn:cqrs:problem:upstream-unavailable"
    );
    assert_eq!(
        gw.metric(
            "cqrs_gateway_upstream_retries_total",
            &[("upstream", "query")]
        ),
        1.0
    );

    q.restart();
    let res = c
        .get(gw.url("/product/1"))
        .header("authorization", &reader)
        .send()
        .await
        .expect("get");
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "recovered once the upstream is back"
    );

    // Same for a write killed mid-flight; it is never retried.
    let writer = bearer(&["writer"]);
    let pending = tokio::spawn(
        c.post(gw.url("/killme"))
            .header("authorization", &writer)
            .body("{}")
            .send(),
    );
    m.seen.wait_parked(1).await;
    m.kill();
    let res = tokio::time::timeout(PATIENCE, pending)
        .await
        .expect("no hang")
        .expect("task")
        .expect("response");
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    let res = c
        .post(gw.url("/product"))
        .header("authorization", &writer)
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        gw.metric(
            "cqrs_gateway_upstream_retries_total",
            &[("upstream", "mutation")]
        ),
        0.0,
        "writes are never retried"
    );
    m.restart();
    let res = c
        .post(gw.url("/product"))
        .header("authorization", &writer)
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn shutdown_stops_accepting_and_drains_in_flight_requests() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut gw = spawn_gateway(config(&m, &q)).await;
    let c = http();
    let pending = tokio::spawn(
        c.get(gw.url("/slow"))
            .header("authorization", bearer(&["reader"]))
            .send(),
    );
    q.seen.wait_parked(1).await;
    gw.stop();
    // Wait for the listener to close: new connections are refused.
    tokio::time::timeout(PATIENCE, async {
        while tokio::net::TcpStream::connect(gw.addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("listener closed");
    assert!(
        !gw.handle.as_ref().expect("handle").is_finished(),
        "still draining the in-flight request"
    );
    q.seen.open_gate();
    let res = pending
        .await
        .expect("task")
        .expect("in-flight request completes");
    assert_eq!(res.status(), StatusCode::OK);
    let handle = gw.handle.take().expect("handle");
    tokio::time::timeout(PATIENCE, handle)
        .await
        .expect("exits after draining")
        .expect("task")
        .expect("ok");
}

#[tokio::test]
async fn drain_is_bounded_when_a_request_never_finishes() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut cfg = config(&m, &q);
    cfg.drain_timeout = Duration::from_millis(300);
    let mut gw = spawn_gateway(cfg).await;
    let c = http();
    let _pending = tokio::spawn(
        c.get(gw.url("/product/1/stream"))
            .header("authorization", bearer(&["reader"]))
            .send(),
    );
    tokio::time::timeout(PATIENCE, async {
        while q.seen.hits() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("stream opened");
    let started = Instant::now();
    gw.stop();
    let handle = gw.handle.take().expect("handle");
    tokio::time::timeout(PATIENCE, handle)
        .await
        .expect("exits")
        .expect("task")
        .expect("ok");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "waited for the drain period"
    );
}

/// After the shutdown signal the gateway lingers: it still accepts new connections and answers, and every
/// answer carries `Connection: close`, so clients drop their pooled connections to it on a response instead of
/// racing the close of an idle one (the rolling update on a real cluster lost a request that way).
#[tokio::test]
async fn shutdown_lingers_accepting_and_closing_each_connection_after_its_answer() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut cfg = config(&m, &q);
    cfg.shutdown_linger = Duration::from_secs(2);
    let mut gw = spawn_gateway(cfg).await;
    let c = http();
    let before = c.get(gw.url("/healthz")).send().await.expect("before");
    assert_ne!(
        before.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "keep-alive before shutdown"
    );
    let started = Instant::now();
    gw.stop();
    // A new client (a new connection) is still served while the gateway lingers.
    let fresh = http();
    let during = fresh
        .get(gw.url("/product/1"))
        .header("authorization", bearer(&["reader"]))
        .send()
        .await
        .expect("served while lingering");
    assert_eq!(during.status(), StatusCode::OK);
    assert_eq!(
        during.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "answers close their connection while lingering"
    );
    let handle = gw.handle.take().expect("handle");
    tokio::time::timeout(PATIENCE, handle)
        .await
        .expect("exits after lingering")
        .expect("task")
        .expect("ok");
    assert!(started.elapsed() >= Duration::from_millis(1500), "lingered");
}
