use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use futures::StreamExt;

use crate::common::*;

const MB: u64 = 1024 * 1024;

#[tokio::test]
async fn a_50mb_upload_streams_through_without_being_buffered() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut cfg = config(&m, &q);
    cfg.max_body_bytes = 64 * MB;
    let gw = spawn_gateway(cfg).await;

    // The client sends half, then waits until the upstream has *received* data before sending the rest.
    // A gateway that buffered the whole body before forwarding would deadlock here (and the test time out).
    let seen = m.seen.clone();
    let total = 50 * MB;
    let chunk = Bytes::from(vec![b'y'; 64 * 1024]);
    let body = futures::stream::unfold(0u64, move |sent| {
        let (chunk, seen) = (chunk.clone(), seen.clone());
        async move {
            if sent >= total {
                return None;
            }
            if sent == total / 2 {
                let mut rx = seen.uploaded.subscribe();
                let _ = rx.wait_for(|n| *n >= MB).await;
            }
            Some((Ok::<_, std::io::Error>(chunk), sent + 64 * 1024))
        }
    });
    let res = tokio::time::timeout(
        PATIENCE,
        http()
            .post(gw.url("/upload"))
            .header("authorization", bearer(&["writer"]))
            .body(reqwest::Body::wrap_stream(body))
            .send(),
    )
    .await
    .expect("upload finished: the body was streamed, not buffered")
    .expect("send");
    assert_eq!(res.status(), StatusCode::OK);
    let body = json_body(res).await;
    assert_eq!(body["received"], total);
}

#[tokio::test]
async fn a_50mb_download_streams_through_without_being_buffered() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let gw = spawn_gateway(config(&m, &q)).await;
    let total = 50 * MB;
    let started = Instant::now();
    let res = http()
        .get(gw.url(&format!("/big?bytes={total}")))
        .header("authorization", bearer(&["reader"]))
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-length"], total.to_string());
    let mut stream = res.bytes_stream();
    let mut got = 0u64;
    let mut first_byte = None;
    // The upstream stops after 1 MiB until the gate opens: seeing that MiB proves nothing waits for the end.
    while got < MB {
        let chunk = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("first MiB arrives")
            .expect("more")
            .expect("chunk");
        first_byte.get_or_insert_with(|| started.elapsed());
        got += chunk.len() as u64;
    }
    q.seen.open_gate();
    while let Some(chunk) = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("rest arrives")
    {
        got += chunk.expect("chunk").len() as u64;
    }
    assert_eq!(got, total);
    eprintln!(
        "50 MiB download: first byte after {:?}, all after {:?}",
        first_byte,
        started.elapsed()
    );
}

#[tokio::test]
async fn sse_events_pass_through_unbuffered_and_outlive_the_read_timeout() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut cfg = config(&m, &q);
    cfg.read_timeout = Duration::from_millis(300);
    let gw = spawn_gateway(cfg).await;
    let res = http()
        .get(gw.url("/product/7/stream"))
        .header("authorization", bearer(&["reader"]))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut stream = res.bytes_stream();
    let mut text = String::new();
    // The upstream has not finished (it waits for the gate): the first event must still arrive.
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("first event")
            .expect("more")
            .expect("ok");
        text.push_str(std::str::from_utf8(&chunk).expect("utf8"));
    }
    assert!(text.contains(r#"data: {"n":1}"#), "{text}");
    // Stream routes are exempt from the total timeout: outlive it on purpose before the second event.
    tokio::time::sleep(Duration::from_millis(700)).await;
    q.seen.open_gate();
    while let Some(chunk) = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("stream continues")
    {
        text.push_str(std::str::from_utf8(&chunk.expect("stream not cut")).expect("utf8"));
    }
    assert!(text.contains(r#"data: {"n":2}"#), "{text}");
}
