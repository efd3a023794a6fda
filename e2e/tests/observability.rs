//! Dashboards and alerts against real data: Debian's Prometheus scrapes a running stack under a small load;
//! `promtool check rules` / `promtool test rules` pass; every dashboard query parses and the key ones return data.
#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cqrs_e2e::{Stack, StackConfig, seed};
use serde_json::Value;

fn obs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("observability")
}

/// The chart ships the dashboards and the rules; these tests check exactly those files.
fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/cqrs-operator")
}

fn rules_file() -> PathBuf {
    chart_dir().join("rules/alerts.yaml")
}

fn rule_count() -> usize {
    let v: serde_yaml::Value =
        serde_yaml::from_slice(&std::fs::read(rules_file()).unwrap()).unwrap();
    v["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_sequence().unwrap().len())
        .sum()
}

fn tool(name: &str) -> PathBuf {
    let p = PathBuf::from("/usr/bin").join(name);
    assert!(
        p.exists(),
        "{} missing: `apt-get install -y prometheus` (the CI bootstrap installs it)",
        p.display()
    );
    p
}

/// Panel title → its queries, of every dashboard.
fn dashboard_queries() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(chart_dir().join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let d: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            d["uid"].is_string() && d["title"].is_string(),
            "{file}: uid/title"
        );
        for p in d["panels"].as_array().unwrap() {
            let title = p["title"].as_str().unwrap().to_owned();
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{file}: {title} has no query");
            for t in targets {
                out.push((
                    file.clone(),
                    title.clone(),
                    t["expr"].as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    out
}

/// Panels that must show data while the stack runs under load, from `observability/key-panels.txt` (shared
/// with the cluster e2e).
fn key_panels() -> Vec<String> {
    include_str!("../observability/key-panels.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn promtool_checks_and_unit_tests_the_alert_rules() {
    let promtool = tool("promtool");
    let dir = obs_dir();
    for args in [
        vec![
            "check",
            "rules",
            "../../charts/cqrs-operator/rules/alerts.yaml",
        ],
        vec!["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

struct Prometheus {
    child: std::process::Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn query(http: &reqwest::Client, base: &str, q: &str) -> Value {
    let url =
        reqwest::Url::parse_with_params(&format!("{base}/api/v1/query"), &[("query", q)]).unwrap();
    http.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_stack_and_every_dashboard_query_works() {
    let prometheus = tool("prometheus");
    let env = cqrs_devstack::test_env("e2e-observability").await.unwrap();
    let stack = Stack::start(StackConfig::from_test_env(&env).unwrap())
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let port = cqrs_devstack::free_port().unwrap();
    let target = |u: String| u.trim_start_matches("http://").to_owned();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: gateway\n    static_configs: [{{targets: ['{g}']}}]\n  - job_name: mutation\n    static_configs: [{{targets: ['{m}']}}]\n  - job_name: query\n    static_configs: [{{targets: ['{q}']}}]\n",
        rules = rules_file().display(),
        g = target(stack.url(cqrs_e2e::Component::Gateway)),
        m = target(stack.url(cqrs_e2e::Component::Mutation)),
        q = target(stack.url(cqrs_e2e::Component::Query)),
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let child = Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let prom = Prometheus {
        child,
        base: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    };
    let http = reqwest::Client::new();

    // All three targets up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", prom.base),
            &[("query", "sum(up)")],
        )
        .unwrap();
        if let Ok(r) = http.get(url).send().await
            && let Ok(v) = r.json::<Value>().await
            && v["data"]["result"][0]["value"][1] == "3"
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape the three services; log in {:?}",
            prom._dir.path()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Data first: a small seed, then a steady trickle (commands, reads with read-your-writes, a refused
    // request now and then) that keeps running while the queries are checked, so rates are never empty.
    let report = seed::run(
        &stack.gateway,
        &seed::SeedOptions {
            users: 50,
            products: 50,
            orders: 50,
            concurrency: 8,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(report.passed());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let (gw, stop) = (stack.gateway.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            let mut user = None;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                i += 1;
                if i % 5 == 1 {
                    let r = gw
                        .post("/user", &seed::user_body("obs", i as usize))
                        .await
                        .unwrap();
                    user = r.id();
                }
                let p = gw
                    .post("/product", &seed::product_body("obs", i as usize, 1234))
                    .await
                    .unwrap();
                if let (Some(id), Some(v)) = (p.id(), p.version()) {
                    let _ = gw.get(&format!("/product/{id}"), Some(v)).await;
                    if let Some(u) = &user {
                        let body = serde_json::json!({"userId": u, "items": [{"productId": id, "quantity": 2}]});
                        let _ = gw.post("/order", &body).await;
                    }
                }
                if i.is_multiple_of(10) {
                    let _ = gw
                        .raw(&cqrs_e2e::RawRequest {
                            method: reqwest::Method::GET,
                            path: "/product".into(),
                            headers: vec![],
                            body: None,
                            bearer: None,
                        })
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // Every query parses (status success); key panels return data once the load has been scraped.
    let queries = dashboard_queries();
    assert!(queries.len() >= 25, "{} queries", queries.len());
    for (file, title, expr) in &queries {
        let v = query(&http, &prom.base, expr).await;
        assert_eq!(v["status"], "success", "{file}: {title}: {expr}: {v}");
    }
    let key_panels = key_panels();
    assert!(key_panels.len() >= 10, "{key_panels:?}");
    for key in &key_panels {
        assert!(
            queries.iter().any(|(_, t, _)| t == key),
            "key panel {key} missing"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut missing: Vec<String>;
    loop {
        missing = Vec::new();
        for (file, title, expr) in queries.iter().filter(|(_, t, _)| key_panels.contains(t)) {
            let v = query(&http, &prom.base, expr).await;
            let results = v["data"]["result"].as_array().cloned().unwrap_or_default();
            // Data = at least one series with a number (histogram_quantile over no traffic gives NaN).
            let has = results
                .iter()
                .any(|r| r["value"][1].as_str().is_some_and(|s| s != "NaN"));
            if !has {
                missing.push(format!("{file}: {title}: {expr}"));
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        missing.is_empty(),
        "key panels without data:\n{}",
        missing.join("\n")
    );

    // The alert rules load and evaluate without errors against the real series.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: Value = http
            .get(format!("{}/api/v1/rules", prom.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules.len() == rule_count() && rules.iter().all(|r| r["health"] == "ok");
        if evaluated {
            // Nothing is wrong with a healthy stack: no alert fires.
            let firing: Vec<&Value> = rules.iter().filter(|r| r["state"] == "firing").collect();
            assert!(
                firing.is_empty(),
                "alerts firing on a healthy stack: {firing:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rules not evaluated healthily: {v}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    trickle.await.unwrap();
    drop(prom);
    stack.stop().await;
}
