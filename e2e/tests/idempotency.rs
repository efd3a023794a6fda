//! `Idempotency-Key`s through the gateway are per caller: the gateway forwards the verified token's subject
//! (`X-Auth-Subject`, never a client-sent one) and mutation scopes the key by it, so one writer can never be
//! served another writer's stored response by reusing its key.
#![allow(clippy::unwrap_used)]

use cqrs_e2e::{RawRequest, Resp, Stack, StackConfig};
use reqwest::Method;
use serde_json::{Value, json};

fn post(path: &str, token: &str, key: &str, body: &Value, extra: &[(&str, &str)]) -> RawRequest {
    let mut headers = vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("idempotency-key".to_owned(), key.to_owned()),
    ];
    headers.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    RawRequest {
        method: Method::POST,
        path: path.to_owned(),
        headers,
        body: Some(serde_json::to_vec(body).unwrap()),
        bearer: Some(token.to_owned()),
    }
}

fn replayed(r: &Resp) -> bool {
    r.headers
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_scoped_by_the_token_subject() {
    let env = cqrs_devstack::test_env("e2e-idempotency").await.unwrap();
    let stack = Stack::start(StackConfig::from_test_env(&env).unwrap())
        .await
        .unwrap();
    let gw = &stack.gateway;
    let alice = gw.minter().mint("alice", &["writer"], 600).unwrap();
    let bob = gw.minter().mint("bob", &["writer"], 600).unwrap();
    let body = json!({"name": "Shared key", "price": "7.00"});

    let a1 = gw
        .raw(&post("/product", &alice, "order-form-1", &body, &[]))
        .await
        .unwrap();
    assert_eq!(a1.status.as_u16(), 201, "{}", a1.text);
    assert!(!replayed(&a1));
    // Bob, same key and body, even claiming to be alice in the header the gateway owns: his own product.
    let b1 = gw
        .raw(&post(
            "/product",
            &bob,
            "order-form-1",
            &body,
            &[("x-auth-subject", "alice")],
        ))
        .await
        .unwrap();
    assert_eq!(b1.status.as_u16(), 201, "{}", b1.text);
    assert!(!replayed(&b1), "bob was served alice's stored response");
    assert_ne!(a1.id(), b1.id());
    // Each one's retry replays their own.
    for (token, first) in [(&alice, &a1), (&bob, &b1)] {
        let r = gw
            .raw(&post("/product", token, "order-form-1", &body, &[]))
            .await
            .unwrap();
        assert_eq!(r.status.as_u16(), 201, "{}", r.text);
        assert!(replayed(&r));
        assert_eq!(r.id(), first.id());
    }
    stack.stop().await;
}
