use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;

use crate::common::*;

#[tokio::test]
async fn oversized_bodies_get_413_declared_or_streamed() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut cfg = config(&m, &q);
    cfg.max_body_bytes = 64 * 1024;
    let gw = spawn_gateway(cfg).await;
    let auth = bearer(&["writer"]);

    // Declared too large: refused from the head alone, before any body byte is read or forwarded.
    let head = format!(
        "POST /product HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: 104857600\r\n\r\n"
    );
    let resp = raw_exchange(gw.addr, head.as_bytes()).await;
    assert_eq!(
        raw_status(&resp),
        Some(413),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    assert!(String::from_utf8_lossy(&resp).contains("application/problem+json"));
    assert_eq!(m.seen.hits(), 0);

    // Exactly at the limit passes.
    let ok = http()
        .post(gw.url("/product"))
        .header("authorization", &auth)
        .body(vec![b'a'; 64 * 1024])
        .send()
        .await
        .expect("post");
    assert_eq!(ok.status(), StatusCode::OK);

    // Chunked (no Content-Length) and over the limit: cut off while streaming.
    let chunks = futures::stream::iter(
        (0..32).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'b'; 8 * 1024]))),
    );
    let res = http()
        .post(gw.url("/product"))
        .header("authorization", &auth)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("post");
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert_eq!(gw.metric("cqrs_gateway_body_too_large_total", &[]), 2.0);
}

#[tokio::test]
async fn per_client_rate_limit_answers_429_with_retry_after() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut cfg = config(&m, &q);
    cfg.rate_limit = Some(cqrs_gateway::RateLimit {
        per_second: 0.5,
        burst: 3,
    });
    let gw = spawn_gateway(cfg).await;
    let c = http();
    let alice = bearer(&["reader"]);
    for _ in 0..3 {
        assert_eq!(
            c.get(gw.url("/product/1"))
                .header("authorization", &alice)
                .send()
                .await
                .expect("get")
                .status(),
            StatusCode::OK
        );
    }
    let res = c
        .get(gw.url("/product/1"))
        .header("authorization", &alice)
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry), "{retry}");
    assert_eq!(q.seen.hits(), 3);
    // Another subject has its own bucket.
    let mut bob = claims(&["reader"]);
    bob["sub"] = "bob".into();
    let bob = format!("Bearer {}", sign_hs256(&bob, SECRET));
    assert_eq!(
        c.get(gw.url("/product/1"))
            .header("authorization", &bob)
            .send()
            .await
            .expect("get")
            .status(),
        StatusCode::OK
    );
    assert_eq!(gw.metric("cqrs_gateway_rate_limited_total", &[]), 1.0);
}

#[tokio::test]
async fn requests_beyond_max_in_flight_are_shed_with_503() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut cfg = config(&m, &q);
    cfg.max_in_flight = 2;
    let gw = spawn_gateway(cfg).await;
    let c = http();
    let auth = bearer(&["reader"]);
    let parked: Vec<_> = (0..2)
        .map(|_| tokio::spawn(c.get(gw.url("/slow")).header("authorization", &auth).send()))
        .collect();
    q.seen.wait_parked(2).await;
    let res = c
        .get(gw.url("/product/1"))
        .header("authorization", &auth)
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(json_body(res).await["type"], "urn:cqrs:problem:overloaded");
    q.seen.open_gate();
    for p in parked {
        assert_eq!(
            p.await.expect("task").expect("get").status(),
            StatusCode::OK
        );
    }
    assert_eq!(
        c.get(gw.url("/product/1"))
            .header("authorization", &auth)
            .send()
            .await
            .expect("get")
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn slowloris_headers_are_cut_off_after_the_header_timeout() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut cfg = config(&m, &q);
    cfg.header_read_timeout = Duration::from_millis(300);
    let gw = spawn_gateway(cfg).await;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    // Dribble a header line at a time, never finishing the head.
    s.write_all(b"GET /product/1 HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            if s.write_all(b"x-slow: 1\r\n").await.is_err() {
                break;
            }
            // Pace the dribble by the gateway's reaction, not by a clock: a read that returns means closed.
            match tokio::time::timeout(Duration::from_millis(50), s.read_to_end(&mut buf)).await {
                Ok(_) => break,
                Err(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the gateway closed the slow connection");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "closed by the timeout, not at once: {took:?}"
    );
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    // An idle connection that never sends anything is closed as well.
    let resp = raw_exchange(gw.addr, b"").await;
    assert!(
        resp.is_empty() || raw_status(&resp) == Some(408),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    assert_eq!(q.seen.hits(), 0);
}

#[tokio::test]
async fn junk_request_targets_get_4xx_and_the_gateway_survives() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut cfg = config(&m, &q);
    cfg.auth = cqrs_gateway::AuthSettings::Disabled;
    let gw = spawn_gateway(cfg).await;
    let junk: &[&[u8]] = &[
        b"GET /\xff\xfe\xfd HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"GET /%ff%fe%00%c0%af HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"GET /%%%%zz/../../../etc/passwd HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"GET /\x00\x01 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"GET  HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"G\xc3\x28T / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\nx-bad: \xff\xfe\r\nconnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\nconnection: close\r\n\r\nhello",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"CONNECT evil.example:443 HTTP/1.1\r\nhost: evil.example:443\r\nconnection: close\r\n\r\n",
        b"TRACE / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    ];
    for req in junk {
        let resp = raw_exchange(gw.addr, req).await;
        let status = raw_status(&resp);
        // Either a clean client error, an upstream answer about an unknown path, or a closed connection.
        assert!(
            status.is_none_or(|s| (200..500).contains(&s)),
            "{:?} -> {}",
            String::from_utf8_lossy(req),
            String::from_utf8_lossy(&resp)
        );
    }
    let ok = http()
        .get(gw.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(
        gw.metric("cqrs_gateway_requests_total", &[("status", "500")]),
        0.0
    );
}

#[tokio::test]
async fn beyond_max_connections_new_clients_wait_until_a_slot_frees() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut cfg = config(&m, &q);
    cfg.auth = cqrs_gateway::AuthSettings::Disabled;
    cfg.max_connections = 1;
    let gw = spawn_gateway(cfg).await;

    let first = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    // The kernel completes the second handshake (backlog), but the gateway does not take the connection.
    let mut second = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    second
        .write_all(b"GET /product/1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    // A negative check needs a window: nothing may arrive while the only slot is taken.
    let early =
        tokio::time::timeout(Duration::from_millis(300), second.read_to_end(&mut buf)).await;
    assert!(
        early.is_err(),
        "served beyond the connection cap: {}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(gw.metric("cqrs_gateway_open_connections", &[]), 1.0);
    drop(first);
    tokio::time::timeout(PATIENCE, second.read_to_end(&mut buf))
        .await
        .expect("served once a slot frees")
        .expect("read");
    assert_eq!(
        raw_status(&buf),
        Some(200),
        "{}",
        String::from_utf8_lossy(&buf)
    );
}
