//! The `mutation` binary as a subprocess: configured by environment variables, ready on /readyz, never logs a
//! secret (stdout and stderr captured at debug level), and exits cleanly on SIGTERM.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};

#[tokio::test]
async fn binary_serves_logs_no_secrets_and_stops_on_sigterm() {
    let env = cqrs_devstack::test_env("binary").await.unwrap();
    let port = cqrs_devstack::free_port().unwrap();
    let logs = tempfile_path("mutation-binary-test");
    let out = std::fs::File::create(&logs).unwrap();
    let err = out.try_clone().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mutation"))
        .env("MUTATION_LISTEN", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", &env.pg_url)
        .env("KAFKA_BOOTSTRAP", &env.kafka_bootstrap)
        .env("TOPIC_PREFIX", &env.topic_prefix)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "debug,hyper=info,h2=info")
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    common::eventually(Duration::from_secs(30), "/readyz", || async {
        let r = client.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let secret = "Bin4ry-Secret-Passw0rd";
    let r = client
        .post(format!("{base}/user"))
        .json(&json!({"email": "bin@example.com", "password": secret}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = client
        .patch(format!("{base}/user/{id}"))
        .json(&json!({"password": format!("{secret}2")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(format!("{base}/user"))
        .json(&json!({"email": "bin@example.com", "password": secret}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    common::eventually(Duration::from_secs(30), "the relay to publish", || async {
        let s: Value = client
            .get(format!("{base}/relay/status"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (s["publishedTotal"] == 2 && s["backlog"] == 0).then_some(())
    })
    .await;

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(e) = child.try_wait().unwrap() {
            break e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit within 30 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit}");
    let text = std::fs::read_to_string(&logs).unwrap();
    let _ = std::fs::remove_file(&logs);
    assert!(text.contains("SIGTERM received"), "{text}");
    assert!(text.lines().count() > 5, "debug logging captured");
    for needle in [secret, "$argon2"] {
        assert!(!text.contains(needle), "a log line contains {needle}");
    }
}

fn tempfile_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{name}-{}.log", uuid::Uuid::new_v4().simple()))
}
