use axum::http::StatusCode;
use serde_json::Value;

use crate::common::*;

#[tokio::test]
async fn reads_and_admin_go_to_query_everything_else_to_mutation() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let gw = spawn_gateway(config(&m, &q)).await;
    let c = http();
    let admin = bearer(&["admin"]);

    let res = c
        .get(gw.url("/product/42?fields=a%20b&x=1"))
        .header("authorization", &admin)
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), StatusCode::OK);
    let body = json_body(res).await;
    assert_eq!(body["upstream"], "query");
    assert_eq!(body["path"], "/product/42");
    assert_eq!(body["query"], "fields=a%20b&x=1");

    let res = c
        .head(gw.url("/product/42"))
        .header("authorization", &admin)
        .send()
        .await
        .expect("head");
    assert_eq!(res.status(), StatusCode::OK);
    // HEAD keeps the representation's length although no body follows.
    let res = c
        .head(gw.url("/big?bytes=1000"))
        .header("authorization", &admin)
        .send()
        .await
        .expect("head");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-length"], "1000");
    assert_eq!(q.seen.hits(), 3);

    for method in ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let res = c
            .request(method.clone(), gw.url("/product/42"))
            .header("authorization", &admin)
            .body(r#"{"name":"x"}"#)
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), StatusCode::OK, "{method}");
        let body = json_body(res).await;
        assert_eq!(body["upstream"], "mutation", "{method}");
        assert_eq!(body["method"], method.as_str());
        assert_eq!(body["bodyLen"], 12, "{method}: the body is forwarded");
    }
    assert_eq!(m.seen.hits(), 5);
    assert_eq!(q.seen.hits(), 3);

    // Admin routes belong to query, whatever the method.
    let body = json_body(
        c.get(gw.url("/admin/dlq"))
            .header("authorization", &admin)
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(body["upstream"], "query");
    let body = json_body(
        c.post(gw.url("/admin/rebuild"))
            .header("authorization", &admin)
            .send()
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(body["upstream"], "query", "POST /admin/* goes to query");
    let body = json_body(
        c.delete(gw.url("/admin/projections/rebuild"))
            .header("authorization", &admin)
            .send()
            .await
            .expect("delete"),
    )
    .await;
    assert_eq!(body["upstream"], "query", "DELETE /admin/* goes to query");

    assert_eq!(
        gw.metric(
            "cqrs_gateway_requests_total",
            &[("route", "read"), ("method", "GET"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        gw.metric(
            "cqrs_gateway_requests_total",
            &[("route", "command"), ("method", "POST")]
        ),
        1.0
    );
    assert_eq!(
        gw.metric("cqrs_gateway_requests_total", &[("route", "admin")]),
        3.0
    );
}

#[tokio::test]
async fn the_gateways_own_endpoints_are_not_proxied() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let gw = spawn_gateway(config(&m, &q)).await;
    let c = http();

    // No token needed, nothing forwarded.
    assert_eq!(
        c.get(gw.url("/healthz"))
            .send()
            .await
            .expect("healthz")
            .status(),
        StatusCode::OK
    );
    let ready = c.get(gw.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), StatusCode::OK);
    let _ = c
        .get(gw.url("/product/1"))
        .header("authorization", bearer(&["reader"]))
        .send()
        .await
        .expect("get");
    let metrics = c
        .get(gw.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("cqrs_gateway_requests_total"), "{metrics}");
    assert!(
        metrics.contains("cqrs_gateway_request_duration_seconds_bucket"),
        "{metrics}"
    );
    assert_eq!(
        q.seen.hits() + m.seen.hits(),
        1,
        "only the /product read reached an upstream"
    );

    // The gateway is ready on its own: an upstream that is not ready, or dead, shows in the body and in
    // cqrs_dependency_up, and never takes the gateway out of its Service.
    q.seen
        .ready
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let ready = c.get(gw.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), StatusCode::OK);
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["dependencies"]["query"]["status"], "failing");
    assert_eq!(body["dependencies"]["query"]["required"], false);
    assert_eq!(body["dependencies"]["mutation"]["status"], "ok");
    q.seen
        .ready
        .store(true, std::sync::atomic::Ordering::SeqCst);

    let mut m = m;
    m.kill();
    let ready = c.get(gw.url("/readyz")).send().await.expect("readyz");
    assert_eq!(
        ready.status(),
        StatusCode::OK,
        "a dead upstream does not make the gateway unready"
    );
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["dependencies"]["mutation"]["status"], "failing");
    let metrics = c
        .get(gw.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains(r#"cqrs_dependency_up{dependency="mutation"} 0"#)
            && metrics.contains(r#"cqrs_dependency_up{dependency="query"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn headers_are_sanitised_and_ids_propagated() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let gw = spawn_gateway(config(&m, &q)).await;
    let c = http();

    let res = c
        .get(gw.url("/product/1"))
        .header("authorization", bearer(&["reader"]))
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-auth-subject", "mallory")
        .header("x-auth-role", "admin")
        .header("x-request-id", "client-id-1")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["x-request-id"],
        "client-id-1",
        "the response carries the request id"
    );
    let seen = json_body(res).await;
    let h = &seen["headers"];
    for gone in ["x-private", "keep-alive", "te", "proxy-authorization"] {
        assert!(h.get(gone).is_none(), "{gone} leaked upstream: {h}");
    }
    assert_eq!(
        h["x-auth-subject"], "alice",
        "identity comes from the verified token, not the client"
    );
    assert_eq!(h["x-auth-role"], "reader");
    assert_eq!(h["x-request-id"], "client-id-1");
    let tp = h["traceparent"].as_str().expect("traceparent");
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "trace id kept: {tp}"
    );
    assert!(
        !tp.contains("00f067aa0ba902b7"),
        "the gateway is the new parent: {tp}"
    );
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], gw.addr.to_string());

    // Without client ids the gateway creates them.
    let res = c
        .get(gw.url("/product/1"))
        .header("authorization", bearer(&["reader"]))
        .send()
        .await
        .expect("get");
    let rid = res.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(rid.len(), 36, "uuid: {rid}");
    let seen = json_body(res).await;
    assert_eq!(seen["headers"]["x-request-id"], rid.as_str());
    let tp = seen["headers"]["traceparent"]
        .as_str()
        .expect("traceparent");
    assert_eq!(tp.len(), 55, "{tp}");

    // Hop-by-hop headers from the upstream do not reach the client.
    let res = c
        .get(gw.url("/hop"))
        .header("authorization", bearer(&["reader"]))
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers().get("x-up-hop").is_none(),
        "{:?}",
        res.headers()
    );
    assert!(
        res.headers().get("keep-alive").is_none(),
        "{:?}",
        res.headers()
    );
    assert_eq!(res.headers()["x-up-ok"], "1");
}
