//! Every route's success and failure paths against a real PostgreSQL (and Kafka for /readyz and events).
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use common::{env_config, spawn};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Every log line of this test binary, captured (debug level, sqlx included) so a test can assert that no
/// secret was logged.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer_buf = buf.clone();
        let make_writer = move || BufWriter(writer_buf.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "debug,hyper=info,h2=info,reqwest=info",
            ))
            .with_writer(make_writer)
            .with_ansi(false)
            .try_init();
        buf
    })
    .clone()
}

struct BufWriter(Arc<Mutex<Vec<u8>>>);

impl Write for BufWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn etag(r: &reqwest::Response) -> String {
    r.headers()
        .get("etag")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}

async fn problem(r: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    r.json().await.unwrap()
}

fn fields(p: &Value) -> Vec<String> {
    p["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["field"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn user_lifecycle_and_failures() {
    captured_logs();
    let (_env, c) = env_config("user-lifecycle").await;
    let app = spawn(c).await;

    let r = app
        .post(
            "/user",
            json!({"email": "Ann@Example.com", "password": "correct horse", "name": "Ann"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(etag(&r), "\"1\"");
    let u: Value = r.json().await.unwrap();
    let id = u["id"].as_str().unwrap().to_owned();
    assert_eq!(u["version"], 1);
    assert_eq!(u["email"], "Ann@Example.com");
    assert_eq!(u["name"], "Ann");
    assert!(u.get("password").is_none() && u.get("passwordHash").is_none());

    // Duplicate email, case-insensitively.
    let r = app
        .post(
            "/user",
            json!({"email": "ann@example.COM", "password": "another one"}),
        )
        .await;
    let p = problem(r, StatusCode::CONFLICT).await;
    assert_eq!(p["type"], "urn:cqrs:problem:duplicate-email");

    // PATCH with the right If-Match.
    let r = app
        .client
        .patch(app.url(&format!("/user/{id}")))
        .header("if-match", "\"1\"")
        .json(&json!({"name": "Ann B."}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(etag(&r), "\"2\"");
    let u: Value = r.json().await.unwrap();
    assert_eq!(
        (
            u["name"].as_str(),
            u["version"].as_i64(),
            u["email"].as_str()
        ),
        (Some("Ann B."), Some(2), Some("Ann@Example.com"))
    );

    // Stale If-Match.
    let r = app
        .client
        .patch(app.url(&format!("/user/{id}")))
        .header("if-match", "\"1\"")
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::PRECONDITION_FAILED).await;
    // Malformed If-Match.
    let r = app
        .client
        .patch(app.url(&format!("/user/{id}")))
        .header("if-match", "abc")
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::BAD_REQUEST).await;
    // Without If-Match: last writer wins.
    let r = app
        .client
        .patch(app.url(&format!("/user/{id}")))
        .json(&json!({"email": "ann2@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Invalid values.
    let r = app
        .client
        .patch(app.url(&format!("/user/{id}")))
        .json(&json!({"email": "nope", "name": 5}))
        .send()
        .await
        .unwrap();
    let p = problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&p), vec!["email", "name"]);
    let r = app
        .client
        .patch(app.url(&format!("/user/{id}")))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    // Email taken by another user → 409.
    let r = app
        .post(
            "/user",
            json!({"email": "bob@example.com", "password": "bobs password"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app
        .client
        .patch(app.url(&format!("/user/{id}")))
        .json(&json!({"email": "BOB@example.com"}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::CONFLICT).await;
    // Missing and non-UUID ids.
    let missing = uuid::Uuid::new_v4();
    let r = app
        .client
        .patch(app.url(&format!("/user/{missing}")))
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::NOT_FOUND).await;
    let r = app
        .client
        .patch(app.url("/user/not-a-uuid"))
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::NOT_FOUND).await;

    // DELETE with a stale If-Match, then the right one.
    let r = app
        .client
        .delete(app.url(&format!("/user/{id}")))
        .header("if-match", "\"1\"")
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::PRECONDITION_FAILED).await;
    let r = app
        .client
        .delete(app.url(&format!("/user/{id}")))
        .header("if-match", "\"3\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(etag(&r), "\"4\"");
    let u: Value = r.json().await.unwrap();
    assert!(u["deletedAt"].is_string());
    // Gone: PATCH and DELETE are 404.
    let r = app
        .client
        .delete(app.url(&format!("/user/{id}")))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::NOT_FOUND).await;
    let r = app
        .client
        .patch(app.url(&format!("/user/{id}")))
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::NOT_FOUND).await;
    app.shutdown().await;
}

#[tokio::test]
async fn malformed_requests_get_problem_json() {
    captured_logs();
    let (_env, mut c) = env_config("malformed").await;
    c.max_body_bytes = 4096;
    let app = spawn(c).await;
    let cases: Vec<(reqwest::RequestBuilder, StatusCode)> = vec![
        (
            app.client
                .post(app.url("/user"))
                .header("content-type", "application/json")
                .body("{\"email\": "),
            StatusCode::BAD_REQUEST,
        ),
        (
            app.client
                .post(app.url("/user"))
                .header("content-type", "application/json")
                .body(""),
            StatusCode::BAD_REQUEST,
        ),
        (
            app.client
                .post(app.url("/user"))
                .header("content-type", "text/plain")
                .body("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            app.client.post(app.url("/user")).body("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            app.client.post(app.url("/product")).json(&json!([1, 2])),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            app.client
                .post(app.url("/product"))
                .json(&json!({"name": "x".repeat(10_000), "price": 1})),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            app.client
                .post(app.url("/order"))
                .header("content-type", "application/json")
                .body("nul"),
            StatusCode::BAD_REQUEST,
        ),
        (
            app.client.put(app.url("/user")).json(&json!({})),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            app.client.post(app.url("/nope")).json(&json!({})),
            StatusCode::NOT_FOUND,
        ),
    ];
    for (req, status) in cases {
        let r = req.send().await.unwrap();
        let p = problem(r, status).await;
        assert_eq!(p["status"], status.as_u16());
    }
    // Field errors for every invalid field at once.
    let r = app
        .post(
            "/user",
            json!({"email": 3, "password": "short", "name": ""}),
        )
        .await;
    let p = problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&p), vec!["email", "password", "name"]);
    let r = app.post("/user", json!({})).await;
    let p = problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&p), vec!["email", "password"]);
    // Health endpoints.
    let r = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    app.shutdown().await;
}

#[tokio::test]
async fn products_convert_prices_exactly() {
    captured_logs();
    let (_env, c) = env_config("products").await;
    let app = spawn(c).await;
    for (price, cents) in [
        (json!(19.99), 1999),
        (json!("19.99"), 1999),
        (json!(0.29), 29),
        (json!(7), 700),
        (json!("1234567.8"), 123_456_780),
    ] {
        let r = app
            .post(
                "/product",
                json!({"name": "Widget", "price": price, "description": "d"}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED, "{price}");
        assert_eq!(etag(&r), "\"1\"");
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["priceCents"], cents, "{price}");
        assert_eq!(p["version"], 1);
    }
    // A number with more digits than f64 holds must not be rounded into validity.
    let r = app
        .client
        .post(app.url("/product"))
        .header("content-type", "application/json")
        .body(r#"{"name":"w","price":19.999999999999999999}"#)
        .send()
        .await
        .unwrap();
    let p = problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&p), vec!["price"]);
    for raw in [
        r#"{"name":"w","price":1e3}"#,
        r#"{"name":"w","price":-0.0}"#,
        r#"{"name":"w","price":"1.2.3"}"#,
    ] {
        let r = app
            .client
            .post(app.url("/product"))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(
            fields(&problem(r, StatusCode::UNPROCESSABLE_ENTITY).await),
            vec!["price"],
            "{raw}"
        );
    }
    for bad in [
        json!(19.999),
        json!(-1),
        json!("-0.01"),
        json!("abc"),
        json!(true),
        json!(1_000_000_000_000u64),
        json!(null),
    ] {
        let r = app
            .post("/product", json!({"name": "W", "price": bad}))
            .await;
        let p = problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&p), vec!["price"], "{bad}");
    }
    let r = app.post("/product", json!({"price": 1})).await;
    assert_eq!(
        fields(&problem(r, StatusCode::UNPROCESSABLE_ENTITY).await),
        vec!["name"]
    );

    let r = app
        .post("/product", json!({"name": "Lamp", "price": "10.00"}))
        .await;
    let p: Value = r.json().await.unwrap();
    let id = p["id"].as_str().unwrap().to_owned();
    let r = app
        .client
        .patch(app.url(&format!("/product/{id}")))
        .header("if-match", "\"1\"")
        .json(&json!({"price": 12.5, "description": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(etag(&r), "\"2\"");
    let p: Value = r.json().await.unwrap();
    assert_eq!(
        (
            p["priceCents"].as_i64(),
            p["name"].as_str(),
            p["price"].as_str()
        ),
        (Some(1250), Some("Lamp"), Some("12.50"))
    );
    let r = app
        .client
        .patch(app.url(&format!("/product/{id}")))
        .header("if-match", "\"1\"")
        .json(&json!({"price": 1}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::PRECONDITION_FAILED).await;
    let r = app
        .client
        .patch(app.url(&format!("/product/{id}")))
        .json(&json!({"price": "1.234"}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    let r = app
        .client
        .patch(app.url(&format!("/product/{}", uuid::Uuid::new_v4())))
        .json(&json!({"price": 1}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::NOT_FOUND).await;
    let r = app
        .client
        .delete(app.url(&format!("/product/{id}")))
        .header("if-match", "\"2\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(etag(&r), "\"3\"");
    let r = app
        .client
        .delete(app.url(&format!("/product/{id}")))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::NOT_FOUND).await;
    app.shutdown().await;
}

async fn create(app: &common::Running, path: &str, body: Value) -> String {
    let r = app.post(path, body).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn orders_are_priced_on_the_server() {
    captured_logs();
    let (_env, mut c) = env_config("orders").await;
    c.max_order_items = 3;
    let app = spawn(c).await;
    let user = create(
        &app,
        "/user",
        json!({"email": "o@example.com", "password": "password1", "name": "O"}),
    )
    .await;
    let p1 = create(&app, "/product", json!({"name": "A", "price": "2.50"})).await;
    let p2 = create(&app, "/product", json!({"name": "B", "price": 0.1})).await;

    let r = app
        .post("/order", json!({"userId": user, "items": [{"productId": p1, "quantity": 3, "price": 0}, {"productId": p2, "quantity": 7}], "price": 1}))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(etag(&r), "\"1\"");
    let o: Value = r.json().await.unwrap();
    assert_eq!(o["totalCents"], 750 + 70);
    assert_eq!(o["items"][0]["unitPriceCents"], 250);
    assert_eq!(o["items"][0]["lineTotalCents"], 750);
    assert_eq!(o["items"][1]["productName"], "B");
    assert_eq!(o["user"]["email"], "o@example.com");
    assert_eq!(o["status"], "CREATED");
    let order = o["id"].as_str().unwrap().to_owned();

    let unknown = uuid::Uuid::new_v4().to_string();
    let cases = [
        (
            json!({"userId": unknown, "items": [{"productId": p1, "quantity": 1}]}),
            vec!["userId"],
        ),
        (
            json!({"userId": user, "items": [{"productId": p1, "quantity": 1}, {"productId": unknown, "quantity": 1}]}),
            vec!["items[1].productId"],
        ),
        (
            json!({"userId": user, "items": [{"productId": p1, "quantity": 0}]}),
            vec!["items[0].quantity"],
        ),
        (
            json!({"userId": user, "items": [{"productId": p1, "quantity": 1.5}]}),
            vec!["items[0].quantity"],
        ),
        (json!({"userId": user, "items": []}), vec!["items"]),
        (
            json!({"userId": user, "items": [{"productId": p1, "quantity": 1}, {"productId": p1, "quantity": 1}, {"productId": p1, "quantity": 1}, {"productId": p1, "quantity": 1}]}),
            vec!["items"],
        ),
        (
            json!({"userId": "x", "items": [{"productId": "y", "quantity": 1}]}),
            vec!["userId", "items[0].productId"],
        ),
        (json!({}), vec!["userId", "items"]),
    ];
    for (body, want) in cases {
        let r = app.post("/order", body.clone()).await;
        let p = problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&p), want, "{body}");
    }
    // A deleted product or user cannot be ordered.
    let r = app
        .client
        .delete(app.url(&format!("/product/{p2}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .post(
            "/order",
            json!({"userId": user, "items": [{"productId": p2, "quantity": 1}]}),
        )
        .await;
    assert_eq!(
        fields(&problem(r, StatusCode::UNPROCESSABLE_ENTITY).await),
        vec!["items[0].productId"]
    );

    // Cancel: stale If-Match, then success, then already cancelled.
    let r = app
        .client
        .post(app.url(&format!("/order/{order}/cancel")))
        .header("if-match", "\"7\"")
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::PRECONDITION_FAILED).await;
    let r = app
        .client
        .post(app.url(&format!("/order/{order}/cancel")))
        .header("if-match", "\"1\"")
        .json(&json!({"reason": "changed my mind"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(etag(&r), "\"2\"");
    let o: Value = r.json().await.unwrap();
    assert_eq!(
        (
            o["status"].as_str(),
            o["cancelReason"].as_str(),
            o["totalCents"].as_i64()
        ),
        (Some("CANCELLED"), Some("changed my mind"), Some(820))
    );
    let r = app
        .client
        .post(app.url(&format!("/order/{order}/cancel")))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::CONFLICT).await;
    let r = app
        .client
        .post(app.url(&format!("/order/{unknown}/cancel")))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::NOT_FOUND).await;
    let r = app
        .client
        .post(app.url(&format!("/order/{order}/cancel")))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::BAD_REQUEST).await;

    let r = app
        .client
        .delete(app.url(&format!("/user/{user}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .post(
            "/order",
            json!({"userId": user, "items": [{"productId": p1, "quantity": 1}]}),
        )
        .await;
    assert_eq!(
        fields(&problem(r, StatusCode::UNPROCESSABLE_ENTITY).await),
        vec!["userId"]
    );
    app.shutdown().await;
}

#[tokio::test]
async fn concurrent_patches_with_the_same_if_match_one_wins() {
    captured_logs();
    let (_env, c) = env_config("concurrent-patch").await;
    let app = spawn(c).await;
    let id = create(&app, "/product", json!({"name": "Race", "price": 1})).await;
    for round in 1..=3i64 {
        let futs = (0..24).map(|i| {
            app.client
                .patch(app.url(&format!("/product/{id}")))
                .header("if-match", format!("\"{round}\""))
                .json(&json!({"name": format!("writer {i}")}))
                .send()
        });
        let results = futures::future::join_all(futs).await;
        let statuses: Vec<StatusCode> = results.into_iter().map(|r| r.unwrap().status()).collect();
        let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
        let stale = statuses
            .iter()
            .filter(|s| **s == StatusCode::PRECONDITION_FAILED)
            .count();
        assert_eq!((ok, stale), (1, 23), "round {round}: {statuses:?}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn group_commit_fails_only_the_bad_command() {
    captured_logs();
    let (env, mut c) = env_config("group-commit").await;
    // One transaction at a time, so concurrent commands must share transactions.
    c.group_commit_workers = 1;
    let app = spawn(c).await;
    // 200 concurrent creates; 40 of them reuse 20 emails: exactly 180 succeed, 20 are 409.
    let futs = (0..200).map(|i| {
        let email = if i < 40 {
            format!("dup{}@example.com", i % 20)
        } else {
            format!("u{i}@example.com")
        };
        app.post("/user", json!({"email": email, "password": "password123"}))
    });
    let statuses: Vec<StatusCode> = futures::future::join_all(futs)
        .await
        .into_iter()
        .map(|r| r.status())
        .collect();
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CREATED)
            .count(),
        180,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CONFLICT)
            .count(),
        20
    );
    // 200 concurrent product creates (no hashing in front of the queue).
    let futs = (0..200).map(|i| app.post("/product", json!({"name": format!("g{i}"), "price": 1})));
    let mut product_ids = Vec::new();
    for r in futures::future::join_all(futs).await {
        assert_eq!(r.status(), StatusCode::CREATED);
        let b: Value = r.json().await.unwrap();
        product_ids.push(b["id"].as_str().unwrap().to_owned());
    }
    // 120 concurrent orders; every 4th names a product that does not exist, every 6th a user that does not:
    // exactly those are refused, each with its own field errors, and the rest are priced and written.
    let pool = sqlx::PgPool::connect(&env.pg_url).await.unwrap();
    let user_ids: Vec<String> = sqlx::query_scalar("select id::text from users order by email")
        .fetch_all(&pool)
        .await
        .unwrap();
    let missing = "00000000-0000-4000-8000-000000000001";
    let app_ref = &app;
    let futs = (0..120).map(|i| {
        let user = if i % 6 == 0 {
            missing
        } else {
            user_ids[i % user_ids.len()].as_str()
        };
        let second = if i % 4 == 0 {
            missing
        } else {
            product_ids[(i + 1) % 200].as_str()
        };
        let body = json!({"userId": user, "items": [
            {"productId": product_ids[i % 200], "quantity": 2},
            {"productId": second, "quantity": 3},
        ]});
        async move { (i, app_ref.post("/order", body).await) }
    });
    let mut placed = 0;
    for (i, r) in futures::future::join_all(futs).await {
        if i % 6 == 0 || i % 4 == 0 {
            let p = problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
            let fields: Vec<&str> = p["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["field"].as_str().unwrap())
                .collect();
            let mut want = Vec::new();
            if i % 6 == 0 {
                want.push("userId");
            }
            if i % 4 == 0 {
                want.push("items[1].productId");
            }
            assert_eq!(fields, want, "order {i}: {p}");
        } else {
            assert_eq!(r.status(), StatusCode::CREATED, "order {i}");
            let b: Value = r.json().await.unwrap();
            // Every product costs 1.00: 2 + 3 units.
            assert_eq!(b["totalCents"], json!(500), "{b}");
            assert_eq!(b["items"].as_array().unwrap().len(), 2, "{b}");
            placed += 1;
        }
    }
    let (orders, items, order_events): (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from orders), (select count(*) from order_items),
                (select count(*) from events e join orders o on o.id = e.aggregate_id
                  where e.type = 'ORDER-CREATED' and (e.data->>'totalCents')::bigint = o.total_cents)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((orders, items, order_events), (placed, 2 * placed, placed));
    // Batches really formed: fewer transactions than commands.
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("cqrs_mutation_group_commit_batch_size_count"))
        .unwrap();
    let batches: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(batches < 400.0, "{batches} transactions for 400 commands");
    // And the shared-statement path carried creations of both kinds.
    for entity in ["user", "product", "order"] {
        let prefix = format!("cqrs_mutation_bulk_created_total{{entity=\"{entity}\"}} ");
        let n: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
            .parse()
            .unwrap();
        assert!(n > 0.0, "{entity}: {n}");
    }
    // State, events and outbox agree: one event per created user.
    let users: i64 = sqlx::query_scalar("select count(*) from users")
        .fetch_one(&pool)
        .await
        .unwrap();
    let events: i64 = sqlx::query_scalar("select count(*) from events where type = 'USER-CREATED'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((users, events), (180, 180));
    let matched_users: i64 = sqlx::query_scalar(
        "select count(*) from users u join events e on e.aggregate_id = u.id
         where e.type = 'USER-CREATED' and e.version = 1 and e.data->>'email' = u.email
           and e.occurred_at = u.created_at",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(matched_users, 180);
    // Product creations of a batch share one statement: each product still has exactly its own event, with
    // its own data, and every event its own position.
    let matched: i64 = sqlx::query_scalar(
        "select count(*) from products p join events e on e.aggregate_id = p.id
         where e.type = 'PRODUCT-CREATED' and e.version = 1 and e.aggregate_type = 'product'
           and e.data->>'name' = p.name and (e.data->>'priceCents')::bigint = p.price_cents
           and p.version = 1 and e.occurred_at = p.created_at",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let (product_events, positions): (i64, i64) = sqlx::query_as(
        "select count(*), count(distinct position) from events where type = 'PRODUCT-CREATED'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((matched, product_events, positions), (200, 200, 200));
    app.wait_drained(Duration::from_secs(30)).await;
    app.shutdown().await;
}

#[tokio::test]
async fn idempotency_key_replays_the_first_response() {
    captured_logs();
    let (_env, c) = env_config("idempotency").await;
    let app = spawn(c).await;
    let body = json!({"email": "idem@example.com", "password": "password123", "name": "I"});
    let send = |body: Value, key: &str| {
        app.client
            .post(app.url("/user"))
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    let r1 = send(body.clone(), "k-1").await.unwrap();
    assert_eq!(r1.status(), StatusCode::CREATED);
    let b1: Value = r1.json().await.unwrap();
    let r2 = send(body.clone(), "k-1").await.unwrap();
    assert_eq!(r2.status(), StatusCode::CREATED);
    assert_eq!(r2.headers()["idempotent-replayed"], "true");
    assert_eq!(etag(&r2), "\"1\"");
    let b2: Value = r2.json().await.unwrap();
    assert_eq!(b1, b2);
    // Same key, other body → 422; other password only → 422 too.
    let r = send(
        json!({"email": "other@example.com", "password": "password123"}),
        "k-1",
    )
    .await
    .unwrap();
    assert_eq!(
        problem(r, StatusCode::UNPROCESSABLE_ENTITY).await["type"],
        "urn:cqrs:problem:idempotency-key-reused"
    );
    let r = send(
        json!({"email": "idem@example.com", "password": "different-pw", "name": "I"}),
        "k-1",
    )
    .await
    .unwrap();
    problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    // Key order does not matter.
    let r = app
        .client
        .post(app.url("/user"))
        .header("idempotency-key", "k-1")
        .header("content-type", "application/json")
        .body(r#"{"name":"I","password":"password123","email":"idem@example.com"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // Concurrent first requests with one key: one command runs, all get the same answer.
    let pbody = json!({"name": "Once", "price": "3.00"});
    let futs = (0..16).map(|_| {
        app.client
            .post(app.url("/product"))
            .header("idempotency-key", "k-2")
            .json(&pbody)
            .send()
    });
    let mut ids = std::collections::HashSet::new();
    for r in futures::future::join_all(futs).await {
        let r = r.unwrap();
        let status = r.status();
        let b: Value = r.json().await.unwrap();
        if status == StatusCode::CREATED {
            ids.insert(b["id"].as_str().unwrap().to_owned());
        } else {
            // A request that found the key still in flight is told to retry.
            assert_eq!(status, StatusCode::CONFLICT, "{b}");
        }
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    // A refused command is not remembered: fixing the body with the same key works.
    let r = app
        .client
        .post(app.url("/product"))
        .header("idempotency-key", "k-3")
        .json(&json!({"name": "x", "price": "1.001"}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    let r = app
        .client
        .post(app.url("/product"))
        .header("idempotency-key", "k-3")
        .json(&json!({"name": "x", "price": "1.00"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app
        .client
        .post(app.url("/product"))
        .header("idempotency-key", "")
        .json(&json!({"name": "x", "price": "1.00"}))
        .send()
        .await
        .unwrap();
    problem(r, StatusCode::BAD_REQUEST).await;
    app.shutdown().await;
}

#[tokio::test]
async fn idempotency_keys_are_per_caller_and_every_body_is_hashed() {
    captured_logs();
    let (_env, c) = env_config("idempotency-scope").await;
    let app = spawn(c).await;
    // `subject`: the X-Auth-Subject the gateway sets from the verified token (None: no subject at all).
    let send = |path: String, body: Value, key: &'static str, subject: Option<&'static str>| {
        let mut rb = app
            .client
            .post(app.url(&path))
            .header("idempotency-key", key)
            .json(&body);
        if let Some(s) = subject {
            rb = rb.header("x-auth-subject", s);
        }
        rb.send()
    };
    let body = json!({"name": "Scoped", "price": "4.00"});
    let r = send("/product".into(), body.clone(), "shared", Some("alice"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let alice: Value = r.json().await.unwrap();

    // Another caller with the same key and body gets its own command executed, not alice's response.
    let r = send("/product".into(), body.clone(), "shared", Some("bob"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(
        r.headers().get("idempotent-replayed").is_none(),
        "bob was served alice's stored response"
    );
    let bob: Value = r.json().await.unwrap();
    assert_ne!(alice["id"], bob["id"]);
    // Nor may another caller's other body be refused because of alice's key.
    let r = send(
        "/product".into(),
        json!({"name": "Other", "price": "5.00"}),
        "shared",
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "no subject is its own scope"
    );
    // Each caller still gets its own replay.
    for (who, first) in [("alice", &alice), ("bob", &bob)] {
        let r = send("/product".into(), body.clone(), "shared", Some(who))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(r.headers()["idempotent-replayed"], "true", "{who}");
        let b: Value = r.json().await.unwrap();
        assert_eq!(&b, first, "{who}");
    }

    // Cancel hashes its body: the same key with another reason is a reused key (422), not a replay.
    let user = create(
        &app,
        "/user",
        json!({"email": "cancel-idem@example.com", "password": "password1"}),
    )
    .await;
    let product = alice["id"].as_str().unwrap().to_owned();
    let order = create(
        &app,
        "/order",
        json!({"userId": user, "items": [{"productId": product, "quantity": 1}]}),
    )
    .await;
    let path = format!("/order/{order}/cancel");
    let r = send(
        path.clone(),
        json!({"reason": "too slow"}),
        "c-1",
        Some("alice"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cancelled: Value = r.json().await.unwrap();
    assert_eq!(cancelled["cancelReason"], "too slow");
    let r = send(
        path.clone(),
        json!({"reason": "changed my mind"}),
        "c-1",
        Some("alice"),
    )
    .await
    .unwrap();
    assert_eq!(
        problem(r, StatusCode::UNPROCESSABLE_ENTITY).await["type"],
        "urn:cqrs:problem:idempotency-key-reused"
    );
    let r = send(
        path.clone(),
        json!({"reason": "too slow"}),
        "c-1",
        Some("alice"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.json::<Value>().await.unwrap(), cancelled);
    app.shutdown().await;
}

#[tokio::test]
async fn no_password_or_hash_in_events_responses_or_logs() {
    let logs = captured_logs();
    let (env, mut c) = env_config("no-secrets").await;
    // Production hashing parameters here: check them in the stored hash.
    c.argon2_memory_kib = 19_456;
    c.argon2_iterations = 2;
    let app = spawn(c).await;
    let secret = "Tr0ub4dor&3-secret-pw";
    let secret2 = "n3w-Secret-Passw0rd!";
    let r = app
        .client
        .post(app.url("/user"))
        .header("idempotency-key", "s-1")
        .json(&json!({"email": "secret@example.com", "password": secret, "name": "S"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut responses = r.text().await.unwrap();
    let id = serde_json::from_str::<Value>(&responses).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app
        .client
        .post(app.url("/user"))
        .header("idempotency-key", "s-1")
        .json(&json!({"email": "secret@example.com", "password": secret, "name": "S"}))
        .send()
        .await
        .unwrap();
    responses.push_str(&r.text().await.unwrap());
    let r = app
        .client
        .patch(app.url(&format!("/user/{id}")))
        .json(&json!({"password": secret2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    responses.push_str(&r.text().await.unwrap());
    let r = app
        .post(
            "/user",
            json!({"email": "secret@example.com", "password": secret}),
        )
        .await;
    responses.push_str(&r.text().await.unwrap());
    let r = app
        .post("/user", json!({"email": "bad", "password": secret}))
        .await;
    responses.push_str(&r.text().await.unwrap());

    let pool = sqlx::PgPool::connect(&env.pg_url).await.unwrap();
    let hash: String = sqlx::query_scalar("select password_hash from users where id = $1::uuid")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
    let salt_and_hash = hash.rsplit('$').take(2).collect::<Vec<_>>();

    app.wait_drained(Duration::from_secs(30)).await;
    let events = tokio::task::spawn_blocking({
        let (b, p) = (env.kafka_bootstrap.clone(), env.topic_prefix.clone());
        move || common::consume_until(&b, &p, Duration::from_secs(30), |e| e.len() >= 2)
    })
    .await
    .unwrap();
    assert_eq!(events.len(), 2);
    let stored: Vec<String> = sqlx::query_scalar("select data::text || metadata::text from events")
        .fetch_all(&pool)
        .await
        .unwrap();
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("mutation") || !logs.is_empty(),
        "log capture works"
    );
    for (what, text) in [
        ("responses", responses),
        (
            "kafka events",
            events
                .iter()
                .map(|e| e.raw.clone())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        ("stored events", stored.join("\n")),
        ("logs", logs),
    ] {
        for needle in [
            secret,
            secret2,
            "$argon2",
            salt_and_hash[0],
            salt_and_hash[1],
        ] {
            assert!(!text.contains(needle), "{what} contain a secret ({needle})");
        }
        assert!(
            !text.to_lowercase().contains("password_hash") || what == "logs",
            "{what} mention password_hash"
        );
    }
    app.shutdown().await;
}

/// Shutdown lets a command that is already inside a transaction finish and answer.
#[tokio::test]
async fn shutdown_drains_in_flight_commands() {
    captured_logs();
    let (env, c) = env_config("drain").await;
    let app = spawn(c).await;
    let id = create(&app, "/product", json!({"name": "Held", "price": 1})).await;
    let pool = sqlx::PgPool::connect(&env.pg_url).await.unwrap();
    // Hold the product's row lock so the PATCH waits inside its transaction.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("select 1 from products where id = $1::uuid for update")
        .bind(&id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let patch = tokio::spawn(
        app.client
            .patch(app.url(&format!("/product/{id}")))
            .json(&json!({"name": "After"}))
            .send(),
    );
    common::eventually(Duration::from_secs(10), "the PATCH waiting on the row lock", || async {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        (waiting >= 1).then_some(())
    })
    .await;
    let common::Running {
        mut handle,
        stop,
        base,
        ..
    } = app;
    stop.unwrap().send(()).unwrap();
    // Shutting down: new connections are refused while the held command is still in flight.
    common::eventually(Duration::from_secs(10), "the listener closing", || async {
        reqwest::Client::new()
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(!handle.is_finished());
    holder.commit().await.unwrap();
    let r = patch.await.unwrap().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["name"], "After");
    tokio::time::timeout(Duration::from_secs(20), &mut handle)
        .await
        .unwrap()
        .unwrap();
}

/// The whole shutdown fits its budget (SHUTDOWN_TIMEOUT_SECS) under load, even with a command that cannot
/// finish (held on a row lock for the whole shutdown) and a relay stuck on an unreachable Kafka: the phases
/// share one deadline instead of each taking its own bound one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_within_its_budget_under_load() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    captured_logs();
    let (env, mut c) = env_config("shutdown-budget").await;
    let budget = Duration::from_secs(3);
    c.shutdown_timeout_secs = budget.as_secs();
    // Nothing listens there: the relay is busy with its admin and produce timeouts when the shutdown begins.
    c.kafka_bootstrap = format!("127.0.0.1:{}", cqrs_devstack::free_port().unwrap());
    let app = spawn(c).await;
    let id = create(&app, "/product", json!({"name": "Held", "price": 1})).await;
    let pool = sqlx::PgPool::connect(&env.pg_url).await.unwrap();
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("select 1 from products where id = $1::uuid for update")
        .bind(&id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let held = tokio::spawn(
        app.client
            .patch(app.url(&format!("/product/{id}")))
            .json(&json!({"name": "Never"}))
            .send(),
    );
    common::eventually(Duration::from_secs(10), "the PATCH waiting on the row lock", || async {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        (waiting >= 1).then_some(())
    })
    .await;

    // Load: 32 clients creating products until the service stops answering.
    let done = Arc::new(AtomicBool::new(false));
    let created = Arc::new(AtomicU64::new(0));
    let unexpected = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let (client, url) = (app.client.clone(), app.url("/product"));
            let (done, created, unexpected) = (done.clone(), created.clone(), unexpected.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) {
                    n += 1;
                    let r = client
                        .post(&url)
                        .json(&json!({"name": format!("load {i}-{n}"), "price": "1.00"}))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == StatusCode::CREATED => {
                            created.fetch_add(1, Ordering::Relaxed);
                        }
                        // At the deadline a queued command may be told the service is going away.
                        Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {}
                        Ok(r) => unexpected.lock().unwrap().push(r.status().as_u16()),
                        // Refused or cut: the listener is closed / the budget is over.
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    common::eventually(Duration::from_secs(30), "load flowing", || async {
        (created.load(Ordering::Relaxed) >= 200).then_some(())
    })
    .await;

    let common::Running {
        mut handle, stop, ..
    } = app;
    let started = std::time::Instant::now();
    stop.unwrap().send(()).unwrap();
    let finished = tokio::time::timeout(budget * 5, &mut handle).await;
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    assert!(finished.is_ok(), "shutdown still running after {elapsed:?}");
    // The deadline is enforced by timers; the slack covers aborting what is left and a busy machine.
    assert!(
        elapsed <= budget + Duration::from_millis(1500),
        "shutdown took {elapsed:?} with a budget of {budget:?}"
    );
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
    }
    assert!(
        unexpected.lock().unwrap().is_empty(),
        "{:?}",
        unexpected.lock().unwrap()
    );
    // The held command could not commit within the budget: it was cut or told 503, and never applied.
    match held.await.unwrap() {
        Err(_) => {}
        Ok(r) => assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE),
    }
    holder.rollback().await.unwrap();
    let name: String = sqlx::query_scalar("select name from products where id = $1::uuid")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(name, "Held");
}

/// An expired Idempotency-Key is forgotten: the same key then starts a new request.
#[tokio::test]
async fn idempotency_keys_expire() {
    captured_logs();
    let (_env, mut c) = env_config("idempotency-ttl").await;
    c.idempotency_ttl_secs = 1;
    let app = spawn(c).await;
    let send = |name: &str| {
        app.client
            .post(app.url("/product"))
            .header("idempotency-key", "ttl-1")
            .json(&json!({"name": name, "price": 1}))
            .send()
    };
    let first = send("first").await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    // Within the TTL another body is refused; once it expired, the key is free again.
    let r = send("second").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let second: Value =
        common::eventually(Duration::from_secs(10), "the key to expire", || async {
            let r = send("second").await.unwrap();
            if r.status() == StatusCode::CREATED {
                Some(r.json().await.unwrap())
            } else {
                None
            }
        })
        .await;
    assert_ne!(first["id"], second["id"]);
    assert_eq!(second["name"], "second");
    app.shutdown().await;
}
