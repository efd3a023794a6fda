//! `hostile`: bad input of every kind through the gateway. Only documented 4xx answers are acceptable: never a
//! 5xx, never a crash, and nothing stored.

use std::time::Duration;

use reqwest::Method;
use serde::Serialize;
use serde_json::json;

use crate::{
    E2eError,
    client::{Gateway, RawRequest, TokenMinter, b64url},
};

/// A body over mutation's limit (256 KiB); before gateway commit 536a46a it was sometimes answered by a reset.
pub const BODY_OVER_MUTATION_LIMIT: &str = "body over mutation limit (400 KiB)";

/// One hostile request and the answers the API documents for it.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub req: RawRequest,
    pub expect: Vec<u16>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub name: String,
    pub method: String,
    pub path: String,
    pub status: Option<u16>,
    pub expected: Vec<u16>,
    pub problem_json: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostileReport {
    pub cases: usize,
    pub server_errors: usize,
    /// Answers outside the documented set (including any 2xx and any transport failure).
    pub unexpected: usize,
    /// 4xx answers that were not `application/problem+json`.
    pub not_problem_json: usize,
    pub stored_before: [u64; 3],
    pub stored_after: [u64; 3],
    pub healthy_after: bool,
    pub results: Vec<CaseResult>,
}

impl HostileReport {
    pub fn passed(&self) -> bool {
        self.server_errors == 0
            && self.unexpected == 0
            && self.healthy_after
            && self.stored_before == self.stored_after
    }

    /// Unexpected answers, not counting the named cases (known bugs kept visible by their own tests).
    pub fn unexpected_except(&self, known: &[&str]) -> Vec<&CaseResult> {
        self.results
            .iter()
            .filter(|r| !known.contains(&r.name.as_str()))
            .filter(|r| !r.status.is_some_and(|s| r.expected.contains(&s)))
            .collect()
    }

    pub fn print(&self) {
        for r in &self.results {
            let ok = r.status.is_some_and(|s| r.expected.contains(&s));
            if !ok || !r.problem_json {
                println!(
                    "  {} {:<44} {} {} → {} (expected {:?}){}",
                    if ok { "note" } else { "FAIL" },
                    r.name,
                    r.method,
                    truncate(&r.path, 60),
                    r.status
                        .map_or_else(|| "no answer".into(), |s| s.to_string()),
                    r.expected,
                    if r.problem_json {
                        "".to_owned()
                    } else {
                        " [not problem+json]".to_owned()
                    } + &r
                        .error
                        .clone()
                        .map(|e| format!(" error: {e}"))
                        .unwrap_or_default()
                );
            }
        }
        println!(
            "hostile: {} cases, {} 5xx, {} unexpected answers, {} 4xx without problem+json, stored before {:?} after {:?}, healthy after: {}",
            self.cases,
            self.server_errors,
            self.unexpected,
            self.not_problem_json,
            self.stored_before,
            self.stored_after,
            self.healthy_after
        );
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_owned()
    } else {
        format!("{}…({} bytes)", &s[..s.floor_char_boundary(n)], s.len())
    }
}

fn req(method: Method, path: &str, bearer: Option<&str>, body: Option<Vec<u8>>) -> RawRequest {
    let headers = if body.is_some() {
        vec![("content-type".into(), "application/json".into())]
    } else {
        vec![]
    };
    RawRequest {
        method,
        path: path.to_owned(),
        headers,
        body,
        bearer: bearer.map(str::to_owned),
    }
}

fn case(name: &str, r: RawRequest, expect: &[u16]) -> Case {
    Case {
        name: name.to_owned(),
        req: r,
        expect: expect.to_vec(),
    }
}

/// An unsigned token (`alg: none`) claiming `admin`.
fn alg_none_token() -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let exp = chrono::Utc::now().timestamp() + 3600;
    let claims = b64url(format!(r#"{{"sub":"mallory","roles":["admin"],"exp":{exp}}}"#).as_bytes());
    format!("{header}.{claims}.")
}

/// Every hostile case. `admin` is a valid admin token; `minter` signs with the gateway's real secret.
#[allow(clippy::vec_init_then_push)] // one case per line reads best
pub fn cases(admin: &str, minter: &TokenMinter) -> Result<Vec<Case>, E2eError> {
    let reader = minter.mint("hostile-reader", &["reader"], 3600)?;
    let writer = minter.mint("hostile-writer", &["writer"], 3600)?;
    let no_roles = minter.mint("hostile-nobody", &[], 3600)?;
    let unknown_role = minter.mint("hostile-root", &["root", "superuser"], 3600)?;
    let expired = minter.mint("hostile-expired", &["admin"], -3600)?;
    let wrong_key = TokenMinter::new(b"this-is-not-the-gateway-secret-at-all!!".to_vec()).mint(
        "mallory",
        &["admin"],
        3600,
    )?;
    let tampered = {
        // A valid reader token whose payload was swapped for an admin one (signature no longer matches).
        let parts: Vec<&str> = reader.split('.').collect();
        let exp = chrono::Utc::now().timestamp() + 3600;
        let payload =
            b64url(format!(r#"{{"sub":"mallory","roles":["admin"],"exp":{exp}}}"#).as_bytes());
        format!(
            "{}.{}.{}",
            parts.first().unwrap_or(&""),
            payload,
            parts.get(2).unwrap_or(&"")
        )
    };
    let none = alg_none_token();
    let a = Some(admin);
    let unknown = uuid::Uuid::new_v4().to_string();
    let j = |v: serde_json::Value| Some(v.to_string().into_bytes());
    let valid_user =
        || j(json!({"email": "hostile@e2e.example.com", "password": "long-enough-1", "name": "H"}));
    let mut c = Vec::new();

    // --- authentication and authorization
    c.push(case(
        "no token, read",
        req(Method::GET, "/product", None, None),
        &[401],
    ));
    c.push(case(
        "no token, write",
        req(Method::POST, "/user", None, valid_user()),
        &[401],
    ));
    c.push(case(
        "bad signature",
        req(Method::POST, "/user", Some(&wrong_key), valid_user()),
        &[401],
    ));
    c.push(case(
        "tampered payload",
        req(Method::POST, "/user", Some(&tampered), valid_user()),
        &[401],
    ));
    c.push(case(
        "alg=none",
        req(Method::POST, "/user", Some(&none), valid_user()),
        &[401],
    ));
    c.push(case(
        "alg=none read",
        req(Method::GET, "/user", Some(&none), None),
        &[401],
    ));
    c.push(case(
        "expired token",
        req(Method::POST, "/user", Some(&expired), valid_user()),
        &[401],
    ));
    c.push(case(
        "garbage token",
        req(Method::GET, "/product", Some("not.a.jwt"), None),
        &[401],
    ));
    c.push(case(
        "empty bearer",
        req(Method::GET, "/product", Some(""), None),
        &[401],
    ));
    let mut basic = req(Method::GET, "/product", None, None);
    basic
        .headers
        .push(("authorization".into(), "Basic YWRtaW46YWRtaW4=".into()));
    c.push(case("basic auth instead of bearer", basic, &[401]));
    c.push(case(
        "reader writes",
        req(Method::POST, "/user", Some(&reader), valid_user()),
        &[403],
    ));
    c.push(case(
        "reader deletes",
        req(
            Method::DELETE,
            &format!("/product/{unknown}"),
            Some(&reader),
            None,
        ),
        &[403],
    ));
    c.push(case(
        "token without roles writes",
        req(Method::POST, "/user", Some(&no_roles), valid_user()),
        &[403],
    ));
    c.push(case(
        "token without roles reads",
        req(Method::GET, "/product", Some(&no_roles), None),
        &[403],
    ));
    c.push(case(
        "unknown roles only",
        req(Method::POST, "/user", Some(&unknown_role), valid_user()),
        &[403],
    ));
    c.push(case(
        "writer reads admin DLQ",
        req(Method::GET, "/admin/dlq", Some(&writer), None),
        &[403],
    ));
    c.push(case(
        "reader, /%61dmin path trick",
        req(Method::GET, "/%61dmin/dlq", Some(&reader), None),
        &[403, 404],
    ));
    c.push(case(
        "reader, //Admin path trick",
        req(Method::GET, "//Admin/dlq", Some(&reader), None),
        &[403, 404],
    ));
    c.push(case(
        "reader, /x/../admin path trick",
        req(
            Method::GET,
            "/product/%2e%2e/admin/dlq",
            Some(&reader),
            None,
        ),
        &[400, 403, 404],
    ));
    c.push(case(
        "writer starts a rebuild",
        req(
            Method::POST,
            "/admin/projections/rebuild",
            Some(&writer),
            j(json!({"generation": 99})),
        ),
        &[403],
    ));

    // --- malformed bodies
    c.push(case(
        "malformed JSON",
        req(
            Method::POST,
            "/user",
            a,
            Some(br#"{"email": "a@b.io","#.to_vec()),
        ),
        &[400],
    ));
    c.push(case(
        "trailing garbage",
        req(
            Method::POST,
            "/product",
            a,
            Some(br#"{"name":"x","price":1} xyz"#.to_vec()),
        ),
        &[400],
    ));
    c.push(case(
        "empty body",
        req(Method::POST, "/user", a, Some(Vec::new())),
        &[400],
    ));
    c.push(case(
        "JSON array body",
        req(Method::POST, "/user", a, Some(b"[]".to_vec())),
        &[422],
    ));
    c.push(case(
        "JSON string body",
        req(Method::POST, "/order", a, Some(br#""order""#.to_vec())),
        &[422],
    ));
    let mut text_ct = req(Method::POST, "/user", a, valid_user());
    text_ct.headers = vec![("content-type".into(), "text/plain".into())];
    c.push(case("text/plain content type", text_ct, &[415]));
    let mut no_ct = req(
        Method::POST,
        "/product",
        a,
        j(json!({"name": "x", "price": 1})),
    );
    no_ct.headers.clear();
    c.push(case("no content type", no_ct, &[415]));
    let mut bad_utf8 = br#"{"email":""#.to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
    bad_utf8.extend_from_slice(br#"@x.io","password":"12345678xx"}"#);
    c.push(case(
        "invalid UTF-8",
        req(Method::POST, "/user", a, Some(bad_utf8)),
        &[400],
    ));
    let deep = format!("{}1{}", "[".repeat(50_000), "]".repeat(50_000));
    c.push(case(
        "deep nesting (50k arrays)",
        req(Method::POST, "/order", a, Some(deep.into_bytes())),
        &[400, 413],
    ));
    let deep_obj = format!(
        r#"{{"userId":"{unknown}","items":{}1{}}}"#,
        r#"[{"x":"#.repeat(2_000),
        "}]".repeat(2_000)
    );
    c.push(case(
        "deep nesting in a field",
        req(Method::POST, "/order", a, Some(deep_obj.into_bytes())),
        &[400, 422],
    ));
    c.push(case(
        "huge body (2 MiB)",
        req(
            Method::POST,
            "/product",
            a,
            Some(format!(r#"{{"name":"{}","price":1}}"#, "x".repeat(2 << 20)).into_bytes()),
        ),
        &[413],
    ));
    c.push(case(
        BODY_OVER_MUTATION_LIMIT,
        req(
            Method::POST,
            "/product",
            a,
            Some(
                format!(
                    r#"{{"name":"x","price":1,"description":"{}"}}"#,
                    "y".repeat(400 << 10)
                )
                .into_bytes(),
            ),
        ),
        &[413],
    ));
    c.push(case("many items (10k)", req(Method::POST, "/order", a, j(json!({"userId": unknown, "items": vec![json!({"productId": unknown, "quantity": 1}); 10_000]}))), &[413, 422]));

    // --- wrong types and invalid values
    c.push(case(
        "user: wrong types",
        req(
            Method::POST,
            "/user",
            a,
            j(json!({"email": 5, "password": true, "name": []})),
        ),
        &[422],
    ));
    c.push(case(
        "user: missing fields",
        req(Method::POST, "/user", a, j(json!({}))),
        &[422],
    ));
    c.push(case(
        "user: short password",
        req(
            Method::POST,
            "/user",
            a,
            j(json!({"email": "s@e2e.example.com", "password": "x"})),
        ),
        &[422],
    ));
    c.push(case(
        "user: NUL in email",
        req(
            Method::POST,
            "/user",
            a,
            j(json!({"email": "a\u{0}b@e2e.example.com", "password": "long-enough-1"})),
        ),
        &[422],
    ));
    c.push(case("user: name too long", req(Method::POST, "/user", a, j(json!({"email": "long@e2e.example.com", "password": "long-enough-1", "name": "n".repeat(201)}))), &[422]));
    c.push(case(
        "product: price as word",
        req(
            Method::POST,
            "/product",
            a,
            j(json!({"name": "x", "price": "cheap"})),
        ),
        &[422],
    ));
    c.push(case(
        "product: negative price",
        req(
            Method::POST,
            "/product",
            a,
            j(json!({"name": "x", "price": -1})),
        ),
        &[422],
    ));
    c.push(case(
        "product: 3 decimals",
        req(
            Method::POST,
            "/product",
            a,
            Some(br#"{"name":"x","price":1.999}"#.to_vec()),
        ),
        &[422],
    ));
    c.push(case(
        "product: exponent",
        req(
            Method::POST,
            "/product",
            a,
            Some(br#"{"name":"x","price":1e3}"#.to_vec()),
        ),
        &[422],
    ));
    c.push(case(
        "product: enormous price",
        req(
            Method::POST,
            "/product",
            a,
            Some(br#"{"name":"x","price":1000000000000000000000000000000}"#.to_vec()),
        ),
        &[422],
    ));
    c.push(case(
        "product: price object",
        req(
            Method::POST,
            "/product",
            a,
            j(json!({"name": "x", "price": {"amount": 1}})),
        ),
        &[422],
    ));
    c.push(case(
        "product: blank name",
        req(
            Method::POST,
            "/product",
            a,
            j(json!({"name": "   ", "price": 1})),
        ),
        &[422],
    ));
    c.push(case(
        "order: quantity as string",
        req(
            Method::POST,
            "/order",
            a,
            j(json!({"userId": unknown, "items": [{"productId": unknown, "quantity": "3"}]})),
        ),
        &[422],
    ));
    c.push(case(
        "order: zero quantity",
        req(
            Method::POST,
            "/order",
            a,
            j(json!({"userId": unknown, "items": [{"productId": unknown, "quantity": 0}]})),
        ),
        &[422],
    ));
    c.push(case(
        "order: fractional quantity",
        req(
            Method::POST,
            "/order",
            a,
            j(json!({"userId": unknown, "items": [{"productId": unknown, "quantity": 1.5}]})),
        ),
        &[422],
    ));
    c.push(case(
        "order: no items",
        req(
            Method::POST,
            "/order",
            a,
            j(json!({"userId": unknown, "items": []})),
        ),
        &[422],
    ));
    c.push(case(
        "order: items not array",
        req(
            Method::POST,
            "/order",
            a,
            j(json!({"userId": unknown, "items": {"0": 1}})),
        ),
        &[422],
    ));

    // --- Mongo operator injection
    c.push(case(
        "mongo $gt as email",
        req(
            Method::POST,
            "/user",
            a,
            j(json!({"email": {"$gt": ""}, "password": "long-enough-1"})),
        ),
        &[422],
    ));
    c.push(case("mongo $gt as userId", req(Method::POST, "/order", a, j(json!({"userId": {"$gt": ""}, "items": [{"productId": {"$ne": null}, "quantity": 1}]}))), &[422]));
    c.push(case(
        "mongo $where as product name",
        req(
            Method::POST,
            "/product",
            a,
            j(json!({"name": {"$where": "sleep(1000)"}, "price": 1})),
        ),
        &[422],
    ));
    c.push(case(
        "mongo $gt as id (read)",
        req(Method::GET, "/user/%7B%22%24gt%22%3A%22%22%7D", a, None),
        &[400, 404],
    ));
    c.push(case(
        "mongo $ne as id (read)",
        req(Method::GET, "/order/%7B%22%24ne%22%3Anull%7D", a, None),
        &[400, 404],
    ));
    c.push(case(
        "mongo $where as id (read)",
        req(Method::GET, "/product/$where", a, None),
        &[400, 404],
    ));
    c.push(case(
        "mongo $gt as id (update)",
        req(
            Method::PATCH,
            "/user/%7B%22%24gt%22%3A%22%22%7D",
            a,
            j(json!({"name": "pwned"})),
        ),
        &[400, 404],
    ));
    c.push(case(
        "mongo $gt as id (delete)",
        req(
            Method::DELETE,
            "/product/%7B%22%24gt%22%3A%22%22%7D",
            a,
            None,
        ),
        &[400, 404],
    ));
    c.push(case(
        "mongo $gt as cursor",
        req(
            Method::GET,
            "/product?cursor=%7B%22%24gt%22%3A%22%22%7D",
            a,
            None,
        ),
        &[400],
    ));
    c.push(case(
        "mongo $gt as limit",
        req(Method::GET, "/product?limit=%7B%22%24gt%22%3A0%7D", a, None),
        &[400],
    ));
    c.push(case(
        "mongo $gt as stream type",
        req(
            Method::GET,
            "/stream?type=%7B%22%24gt%22%3A%22%22%7D",
            a,
            None,
        ),
        &[400],
    ));

    // --- SQL metacharacters
    c.push(case(
        "SQL in id (read)",
        req(Method::GET, "/user/1'%20OR%20'1'%3D'1", a, None),
        &[400, 404],
    ));
    c.push(case(
        "SQL in id (update)",
        req(
            Method::PATCH,
            "/user/'%3B%20DROP%20TABLE%20users%3B--",
            a,
            j(json!({"name": "x"})),
        ),
        &[400, 404],
    ));
    c.push(case(
        "SQL in id (cancel)",
        req(Method::POST, "/order/1%20OR%201%3D1/cancel", a, None),
        &[400, 404],
    ));
    c.push(case(
        "SQL in email",
        req(
            Method::POST,
            "/user",
            a,
            j(json!({"email": "x' OR 1=1--", "password": "long-enough-1"})),
        ),
        &[422],
    ));
    c.push(case("SQL in userId", req(Method::POST, "/order", a, j(json!({"userId": format!("{unknown}' OR '1'='1"), "items": [{"productId": unknown, "quantity": 1}]}))), &[422]));
    c.push(case(
        "SQL in If-Match",
        {
            let mut r = req(
                Method::PATCH,
                &format!("/product/{unknown}"),
                a,
                j(json!({"name": "x"})),
            );
            r.headers.push(("if-match".into(), "\"1\" OR 1=1".into()));
            r
        },
        &[400, 404],
    ));
    c.push(case(
        "SQL in X-Min-Version",
        {
            let mut r = req(Method::GET, &format!("/product/{unknown}"), a, None);
            r.headers
                .push(("x-min-version".into(), "1; DROP TABLE products".into()));
            r
        },
        &[400],
    ));
    c.push(case(
        "SQL in cursor",
        req(Method::GET, "/user?cursor=%27%20OR%201%3D1--", a, None),
        &[400],
    ));

    // --- unknown ids and routes
    for e in ["user", "product", "order"] {
        c.push(case(
            &format!("unknown {e} (read)"),
            req(Method::GET, &format!("/{e}/{unknown}"), a, None),
            &[404],
        ));
    }
    c.push(case(
        "unknown user (update)",
        req(
            Method::PATCH,
            &format!("/user/{unknown}"),
            a,
            j(json!({"name": "x"})),
        ),
        &[404],
    ));
    c.push(case(
        "unknown product (delete)",
        req(Method::DELETE, &format!("/product/{unknown}"), a, None),
        &[404],
    ));
    c.push(case(
        "unknown order (cancel)",
        req(Method::POST, &format!("/order/{unknown}/cancel"), a, None),
        &[404],
    ));
    c.push(case(
        "order for unknown user/product",
        req(
            Method::POST,
            "/order",
            a,
            j(json!({"userId": unknown, "items": [{"productId": unknown, "quantity": 1}]})),
        ),
        &[422],
    ));
    c.push(case(
        "unknown route",
        req(Method::POST, "/nope", a, j(json!({}))),
        &[404],
    ));
    c.push(case(
        "wrong method",
        req(Method::PUT, "/user", a, valid_user()),
        &[404, 405],
    ));
    c.push(case(
        "very long path",
        req(
            Method::GET,
            &format!("/user/{}", "a".repeat(20_000)),
            a,
            None,
        ),
        &[400, 404, 414, 431],
    ));

    // --- header abuse
    let mut idem = req(
        Method::POST,
        "/product",
        a,
        j(json!({"name": "x", "price": "abc"})),
    );
    idem.headers
        .push(("idempotency-key".into(), "k".repeat(300)));
    c.push(case("oversized Idempotency-Key", idem, &[400, 422]));
    let mut neg = req(Method::GET, &format!("/user/{unknown}"), a, None);
    neg.headers.push(("x-min-version".into(), "-1".into()));
    c.push(case("negative X-Min-Version", neg, &[400]));
    let mut big = req(Method::GET, &format!("/user/{unknown}"), a, None);
    big.headers
        .push(("x-min-version".into(), "99999999999999999999999999".into()));
    c.push(case("overflowing X-Min-Version", big, &[400]));
    let mut huge_header = req(Method::GET, "/product", a, None);
    huge_header
        .headers
        .push(("x-junk".into(), "j".repeat(1 << 20)));
    c.push(case("huge header (1 MiB)", huge_header, &[400, 413, 431]));
    Ok(c)
}

async fn counts(gw: &Gateway) -> Result<[u64; 3], E2eError> {
    gw.wait_caught_up(Duration::from_secs(60)).await?;
    Ok([
        gw.count("/user").await?,
        gw.count("/product").await?,
        gw.count("/order").await?,
    ])
}

/// Runs every case against the gateway, then checks health and that nothing was stored.
pub async fn run(gw: &Gateway) -> Result<HostileReport, E2eError> {
    let before = counts(gw).await?;
    let cases = cases(gw.token(), gw.minter())?;
    let mut results = Vec::new();
    let (mut server_errors, mut unexpected, mut not_problem) = (0, 0, 0);
    for c in &cases {
        let r = gw.raw(&c.req).await;
        let (status, problem, error) = match &r {
            Ok(r) => (
                Some(r.status.as_u16()),
                !r.status.is_client_error()
                    || r.content_type().starts_with("application/problem+json"),
                None,
            ),
            Err(e) => (None, true, Some(e.to_string())),
        };
        if status.is_some_and(|s| s >= 500) {
            server_errors += 1;
        }
        if !status.is_some_and(|s| c.expect.contains(&s)) {
            unexpected += 1;
        }
        if !problem {
            not_problem += 1;
        }
        results.push(CaseResult {
            name: c.name.clone(),
            method: c.req.method.to_string(),
            path: c.req.path.clone(),
            status,
            expected: c.expect.clone(),
            problem_json: problem,
            error,
        });
    }
    let healthy_after = gw.ready().await && gw.sync_status().await.is_ok();
    let after = counts(gw).await?;
    Ok(HostileReport {
        cases: cases.len(),
        server_errors,
        unexpected,
        not_problem_json: not_problem,
        stored_before: before,
        stored_after: after,
        healthy_after,
        results,
    })
}
