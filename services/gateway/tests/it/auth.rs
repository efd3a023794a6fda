use std::time::Duration;

use axum::http::StatusCode;
use cqrs_gateway::{AuthSettings, Config, JwtSettings};
use serde_json::{Value, json};

use crate::common::*;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture")
}

fn sign(alg: jsonwebtoken::Algorithm, claims: &Value, key: &jsonwebtoken::EncodingKey) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), claims, key).expect("sign")
}

async fn expect_refused(
    c: &reqwest::Client,
    req: reqwest::RequestBuilder,
    status: StatusCode,
    what: &str,
) -> Value {
    let _ = c;
    let res = req.send().await.expect("send");
    assert_eq!(res.status(), status, "{what}");
    assert_eq!(
        res.headers()["content-type"],
        "application/problem+json",
        "{what}"
    );
    assert!(res.headers().get("x-request-id").is_some(), "{what}");
    let challenge = res
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().expect("ascii").to_owned());
    if status == StatusCode::UNAUTHORIZED {
        assert!(
            challenge
                .as_deref()
                .is_some_and(|c| c.starts_with("Bearer")),
            "{what}: {challenge:?}"
        );
    }
    let body: Value = res.json().await.expect("problem json");
    assert_eq!(body["status"], status.as_u16(), "{what}");
    body
}

#[tokio::test]
async fn bad_tokens_get_401_and_never_reach_an_upstream() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let gw = spawn_gateway(config(&m, &q)).await;
    let c = http();
    let url = gw.url("/product/1");

    let expired = sign_hs256(
        &json!({"sub":"a","roles":["admin"],"iss":ISSUER,"aud":AUDIENCE,"exp": now() - 10}),
        SECRET,
    );
    let not_yet = sign_hs256(
        &json!({"sub":"a","roles":["admin"],"iss":ISSUER,"aud":AUDIENCE,"nbf": now() + 600,"exp": now() + 3600}),
        SECRET,
    );
    let wrong_secret = sign_hs256(
        &claims(&["admin"]),
        b"another-secret-that-is-also-32-bytes-long",
    );
    let mut wrong_aud = claims(&["admin"]);
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = claims(&["admin"]);
    wrong_iss["iss"] = json!("https://evil.test");
    let mut no_exp = claims(&["admin"]);
    no_exp.as_object_mut().expect("object").remove("exp");
    // alg=none: header {"alg":"none"} with an empty signature.
    let none = {
        use base64_url as b;
        format!(
            "{}.{}.",
            b::encode(r#"{"alg":"none","typ":"JWT"}"#),
            b::encode(&claims(&["admin"]).to_string())
        )
    };
    let mut tampered = token(&["reader"]);
    // Flip the payload to claim admin while keeping the reader signature.
    let parts: Vec<&str> = tampered.split('.').collect();
    tampered = format!(
        "{}.{}.{}",
        parts[0],
        base64_url::encode(&claims(&["admin"]).to_string()),
        parts[2]
    );

    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing", None, "unauthenticated"),
        (
            "not bearer",
            Some("Basic YWxpY2U6cHc=".into()),
            "unauthenticated",
        ),
        (
            "garbage",
            Some("Bearer not.a.jwt".into()),
            "unauthenticated",
        ),
        (
            "expired",
            Some(format!("Bearer {expired}")),
            "unauthenticated",
        ),
        (
            "not yet valid",
            Some(format!("Bearer {not_yet}")),
            "unauthenticated",
        ),
        (
            "wrong signature",
            Some(format!("Bearer {wrong_secret}")),
            "unauthenticated",
        ),
        (
            "tampered payload",
            Some(format!("Bearer {tampered}")),
            "unauthenticated",
        ),
        (
            "wrong audience",
            Some(format!("Bearer {}", sign_hs256(&wrong_aud, SECRET))),
            "unauthenticated",
        ),
        (
            "wrong issuer",
            Some(format!("Bearer {}", sign_hs256(&wrong_iss, SECRET))),
            "unauthenticated",
        ),
        (
            "no exp",
            Some(format!("Bearer {}", sign_hs256(&no_exp, SECRET))),
            "unauthenticated",
        ),
        (
            "alg none",
            Some(format!("Bearer {none}")),
            "unauthenticated",
        ),
    ];
    for (what, auth, kind) in &cases {
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let mut req = c.request(method.clone(), &url);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let body = expect_refused(
                &c,
                req,
                StatusCode::UNAUTHORIZED,
                &format!("{what} {method}"),
            )
            .await;
            assert_eq!(body["type"], format!("urn:cqrs:problem:{kind}"), "{what}");
        }
    }
    assert_eq!(
        m.seen.hits() + q.seen.hits(),
        0,
        "nothing reached an upstream"
    );
    assert_eq!(
        gw.metric("cqrs_gateway_auth_failures_total", &[]),
        (cases.len() * 2) as f64
    );
    assert_eq!(
        gw.metric("cqrs_gateway_auth_failures_total", &[("reason", "expired")]),
        2.0
    );
    assert_eq!(
        gw.metric(
            "cqrs_gateway_auth_failures_total",
            &[("reason", "wrong_audience")]
        ),
        2.0
    );
    assert_eq!(
        gw.metric("cqrs_gateway_requests_total", &[("status", "401")]),
        (cases.len() * 2) as f64
    );
}

#[tokio::test]
async fn roles_decide_403_and_admin_implies_writer_implies_reader() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let gw = spawn_gateway(config(&m, &q)).await;
    let c = http();

    // (roles, method, path, allowed)
    let table: &[(&[&str], &str, &str, bool)] = &[
        (&["reader"], "GET", "/product/1", true),
        (&["reader"], "HEAD", "/product/1", true),
        (&["reader"], "POST", "/product", false),
        (&["reader"], "DELETE", "/product/1", false),
        (&["reader"], "GET", "/admin/dlq", false),
        (&["writer"], "GET", "/product/1", true),
        (&["writer"], "POST", "/product", true),
        (&["writer"], "PATCH", "/product/1", true),
        (&["writer"], "GET", "/admin/dlq", false),
        (&["writer"], "POST", "/admin/rebuild", false),
        (&["writer"], "POST", "//admin/rebuild", false),
        (&["writer"], "POST", "/%61dmin/rebuild", false),
        (&["admin"], "GET", "/admin/dlq", true),
        (&["admin"], "POST", "/admin/rebuild", true),
        (&["admin"], "POST", "/order", true),
        (&["admin"], "GET", "/order/1", true),
        (&["unknown-role"], "GET", "/product/1", false),
        (&[], "GET", "/product/1", false),
        (&["reader", "writer"], "POST", "/product", true),
    ];
    let mut allowed = 0;
    for (roles, method, path, ok) in table {
        let before = m.seen.hits() + q.seen.hits();
        let req = c
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
                gw.url(path),
            )
            .header("authorization", bearer(roles));
        let what = format!("{roles:?} {method} {path}");
        if *ok {
            let res = req.send().await.expect("send");
            assert_eq!(res.status(), StatusCode::OK, "{what}");
            allowed += 1;
            assert_eq!(m.seen.hits() + q.seen.hits(), before + 1, "{what}");
        } else {
            let body = expect_refused(&c, req, StatusCode::FORBIDDEN, &what).await;
            assert_eq!(body["type"], "urn:cqrs:problem:forbidden");
            assert_eq!(
                m.seen.hits() + q.seen.hits(),
                before,
                "{what} reached an upstream"
            );
        }
    }
    assert_eq!(
        gw.metric(
            "cqrs_gateway_auth_failures_total",
            &[("reason", "forbidden")]
        ),
        (table.len() - allowed) as f64
    );
}

fn pem_config(m: &TestUpstream, q: &TestUpstream, pem: Vec<u8>) -> Config {
    let mut c = config(m, q);
    c.auth = AuthSettings::Jwt(JwtSettings {
        hs256_secret: None,
        public_keys_pem: Some(String::from_utf8(pem).expect("pem")),
        issuer: None,
        audience: None,
        leeway: Duration::from_secs(0),
    });
    c
}

#[tokio::test]
async fn rs256_and_es256_public_keys_verify_and_algorithm_confusion_fails() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut keys = fixture("rsa_public.pem");
    keys.extend(fixture("ec_public.pem"));
    let gw = spawn_gateway(pem_config(&m, &q, keys)).await;
    let c = http();
    let claims = json!({"sub":"svc","roles":["writer"],"exp": now() + 600});
    use jsonwebtoken::{Algorithm, EncodingKey};

    let rs = sign(
        Algorithm::RS256,
        &claims,
        &EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).expect("rsa"),
    );
    let es = sign(
        Algorithm::ES256,
        &claims,
        &EncodingKey::from_ec_pem(&fixture("ec_private.pem")).expect("ec"),
    );
    for (what, t) in [("RS256", &rs), ("ES256", &es)] {
        let res = c
            .post(gw.url("/order"))
            .header("authorization", format!("Bearer {t}"))
            .send()
            .await
            .expect("post");
        assert_eq!(res.status(), StatusCode::OK, "{what}");
    }
    let before = m.seen.hits();
    let other = sign(
        Algorithm::RS256,
        &claims,
        &EncodingKey::from_rsa_pem(&fixture("other_rsa_private.pem")).expect("rsa"),
    );
    // The classic confusion attack: HMAC "signed" with the public key's PEM bytes.
    let confused = sign(
        Algorithm::HS256,
        &claims,
        &EncodingKey::from_secret(&fixture("rsa_public.pem")),
    );
    for (what, t) in [
        ("RS256 by another key", other),
        ("HS256 with the public key as secret", confused),
    ] {
        let req = c
            .post(gw.url("/order"))
            .header("authorization", format!("Bearer {t}"));
        expect_refused(&c, req, StatusCode::UNAUTHORIZED, what).await;
    }
    assert_eq!(m.seen.hits(), before);
}

#[tokio::test]
async fn auth_disabled_lets_everything_through() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let mut cfg = config(&m, &q);
    cfg.auth = AuthSettings::Disabled;
    let gw = spawn_gateway(cfg).await;
    let c = http();
    assert_eq!(
        c.get(gw.url("/product/1"))
            .send()
            .await
            .expect("get")
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        c.post(gw.url("/admin/rebuild"))
            .send()
            .await
            .expect("post")
            .status(),
        StatusCode::OK
    );
    assert_eq!(m.seen.hits() + q.seen.hits(), 2);
}

#[tokio::test]
async fn mint_token_cli_prints_a_token_the_gateway_accepts() {
    let (m, q) = (
        TestUpstream::start("mutation"),
        TestUpstream::start("query"),
    );
    let gw = spawn_gateway(config(&m, &q)).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "mint-token",
            "--role",
            "writer",
            "--ttl",
            "10m",
            "--issuer",
            ISSUER,
            "--audience",
            AUDIENCE,
        ])
        .env(
            "AUTH_JWT_SECRET",
            std::str::from_utf8(SECRET).expect("utf8"),
        )
        .output()
        .expect("run gateway mint-token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    let c = http();
    let auth = format!("Bearer {token}");
    assert_eq!(
        c.post(gw.url("/product"))
            .header("authorization", &auth)
            .send()
            .await
            .expect("post")
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        c.get(gw.url("/product/1"))
            .header("authorization", &auth)
            .send()
            .await
            .expect("get")
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        c.post(gw.url("/admin/rebuild"))
            .header("authorization", &auth)
            .send()
            .await
            .expect("post")
            .status(),
        StatusCode::FORBIDDEN
    );
}

/// Tiny base64url (no padding) for hand-built tokens.
mod base64_url {
    pub fn encode(s: &str) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, &x)| acc | (u32::from(x) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}
