//! Projection rebuilds end to end against a real API server. The query service's admin API is played by a
//! small real HTTP server in this test that implements the contract (a state machine), because the query
//! service is built concurrently by another team; its progress only advances when the test allows it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, Mutex};

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post},
};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::ConfigMap};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use support::*;

use cqrs_operator::crd::CqrsStack;

#[derive(Default)]
struct Admin {
    serving: i64,
    /// (generation, state, progress, lag)
    rebuild: Option<(i64, String, f64, i64)>,
    /// How many more GETs may advance the rebuild.
    permits: u32,
    posts: Vec<i64>,
    cancelled: Vec<i64>,
    /// Every GET of the state makes a running rebuild's lag one smaller (without finishing it), so each
    /// status the operator writes differs from the last, as with a real rebuild under load.
    drift: bool,
    /// GETs of the state so far.
    gets: u64,
}

type Shared = Arc<Mutex<Admin>>;

async fn start_rebuild(
    State(s): State<Shared>,
    Json(body): Json<Value>,
) -> Result<Json<Value>, (axum::http::StatusCode, Json<Value>)> {
    let n = body["generation"].as_i64().expect("generation");
    let mut a = s.lock().unwrap();
    a.posts.push(n);
    if n < a.serving {
        // As query answers: it never goes back to an older generation.
        return Err((
            axum::http::StatusCode::CONFLICT,
            Json(json!({"type": "generation-conflict", "status": 409})),
        ));
    }
    let same = a
        .rebuild
        .as_ref()
        .is_some_and(|r| r.0 == n && r.1 != "cancelled" && r.1 != "failed");
    if !same && n != a.serving {
        if let Some(r) = a.rebuild.take()
            && (r.1 == "running" || r.1 == "caughtUp")
        {
            a.cancelled.push(r.0);
        }
        a.rebuild = Some((n, "running".into(), 0.0, 100));
    }
    Ok(Json(json!({"generation": n})))
}

/// `DELETE /admin/projections/rebuild`, as query does it: the running rebuild becomes `cancelled`.
async fn cancel_rebuild(State(s): State<Shared>) -> Json<Value> {
    let mut a = s.lock().unwrap();
    if let Some(r) = a.rebuild.as_mut()
        && (r.1 == "running" || r.1 == "caughtUp")
    {
        r.1 = "cancelled".into();
    }
    Json(json!({"serving": a.serving}))
}

async fn projections(State(s): State<Shared>) -> Json<Value> {
    let mut a = s.lock().unwrap();
    a.gets += 1;
    if a.drift
        && let Some(r) = a.rebuild.as_mut()
        && r.1 == "running"
    {
        r.3 = (r.3 - 1).max(1);
    }
    if a.permits > 0
        && let Some(r) = a.rebuild.clone()
    {
        a.permits -= 1;
        let next = match r.1.as_str() {
            "running" if r.2 + 0.5 >= 1.0 => Some((r.0, "caughtUp".to_owned(), 1.0, 0)),
            "running" => Some((r.0, "running".to_owned(), r.2 + 0.5, r.3 / 2)),
            "caughtUp" => {
                a.serving = r.0;
                Some((r.0, "switched".to_owned(), 1.0, 0))
            }
            _ => Some(r.clone()),
        };
        a.rebuild = next;
    }
    let rebuild = a
        .rebuild
        .as_ref()
        .map(|r| json!({"generation": r.0, "state": r.1, "progress": r.2, "lag": r.3}));
    Json(json!({"serving": a.serving, "rebuild": rebuild}))
}

async fn admin_server(state: Shared) -> String {
    let app = Router::new()
        .route("/admin/projections", get(projections))
        .route(
            "/admin/projections/rebuild",
            post(start_rebuild).delete(cancel_rebuild),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn wait_projection(
    stacks: &Api<CqrsStack>,
    what: &str,
    f: impl Fn(&CqrsStack) -> bool,
) -> CqrsStack {
    wait_for(what, TIMEOUT, || async {
        let s = stacks.get("rb").await.ok()?;
        f(&s).then_some(s)
    })
    .await
}

/// Creates the stack `rb` and waits until generation 1 serves.
async fn create_serving_1(stacks: &Api<CqrsStack>) {
    stacks
        .create(&PostParams::default(), &sample_stack("rb"))
        .await
        .expect("create");
    wait_projection(stacks, "serving 1", |s| {
        s.status
            .as_ref()
            .and_then(|st| st.projections.as_ref())
            .and_then(|p| p.serving)
            == Some(1)
    })
    .await;
}

fn rebuilding(s: &CqrsStack) -> Option<(String, String)> {
    condition(s, "Rebuilding").map(|c| (c.0, c.1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_bump_drives_a_rebuild_that_survives_restarts_and_can_be_replaced() {
    let client = client().await;
    let ns = namespace(&client, "rebuild").await;
    let admin: Shared = Arc::new(Mutex::new(Admin {
        serving: 1,
        ..Admin::default()
    }));
    let url = admin_server(admin.clone()).await;
    let config = cqrs_operator::Config {
        query_url_template: url,
        ..config_for(&ns)
    };
    let op = Operator::start(client.clone(), config.clone());
    let stacks: Api<CqrsStack> = Api::namespaced(client.clone(), &ns);
    create_serving_1(&stacks).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let hash = |d: Deployment| {
        d.spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()["cqrs.dev/config-hash"]
            .clone()
    };
    let hash_before = hash(deployments.get("rb-query").await.unwrap());

    // Bump: the operator starts generation 2 and reports it running.
    let pp = PatchParams::default();
    stacks
        .patch(
            "rb",
            &pp,
            &Patch::Merge(json!({"spec": {"projections": {"generation": 2}}})),
        )
        .await
        .expect("bump");
    wait_projection(&stacks, "rebuild 2 running", |s| {
        rebuilding(s) == Some(("True".into(), "Running".into()))
            && s.status
                .as_ref()
                .and_then(|st| st.projections.as_ref())
                .and_then(|p| p.target)
                == Some(2)
    })
    .await;
    assert_eq!(admin.lock().unwrap().posts, vec![2]);

    // Progress is reported in status.
    admin.lock().unwrap().permits = 1;
    let s = wait_projection(&stacks, "progress 0.5", |s| {
        s.status
            .as_ref()
            .and_then(|st| st.projections.as_ref())
            .and_then(|p| p.progress)
            == Some(0.5)
    })
    .await;
    let p = s.status.unwrap().projections.unwrap();
    assert_eq!(
        (p.serving, p.target, p.state.as_deref(), p.lag),
        (Some(1), Some(2), Some("running"), Some(50))
    );

    // Operator restart: the new instance continues from status and the query service, without a new POST.
    op.stop().await;
    let op = Operator::start(client.clone(), config.clone());
    wait_for("restarted operator reconciled", TIMEOUT, || async {
        (op.metric("cqrs_operator_reconciles_total") >= 2.0).then_some(())
    })
    .await;
    assert_eq!(
        admin.lock().unwrap().posts,
        vec![2],
        "an idempotent continuation, not a restart of the rebuild"
    );
    let s = stacks.get("rb").await.unwrap();
    assert_eq!(rebuilding(&s), Some(("True".into(), "Running".into())));

    // A second bump while 2 is running replaces it.
    stacks
        .patch(
            "rb",
            &pp,
            &Patch::Merge(json!({"spec": {"projections": {"generation": 3}}})),
        )
        .await
        .expect("bump again");
    wait_for("rebuild 3 replaces 2", TIMEOUT, || async {
        let a = admin.lock().unwrap();
        (a.posts == vec![2, 3] && a.cancelled == vec![2]).then_some(())
    })
    .await;

    // Let it finish: caught up, switched, and the status flips.
    admin.lock().unwrap().permits = 100;
    let s = wait_projection(&stacks, "serving 3", |s| {
        rebuilding(s) == Some(("False".into(), "RebuildComplete".into()))
    })
    .await;
    let p = s.status.unwrap().projections.unwrap();
    assert_eq!((p.serving, p.target, p.state), (Some(3), Some(3), None));
    assert_eq!(admin.lock().unwrap().serving, 3);

    // The ConfigMap carries the generation, but the pods were not restarted for it (same config hash).
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("rb-config")
        .await
        .unwrap();
    assert_eq!(cm.data.unwrap()["PROJECTION_GENERATION"], "3");
    assert_eq!(
        hash(deployments.get("rb-query").await.unwrap()),
        hash_before
    );
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_query_service_is_reported_not_fatal() {
    let client = client().await;
    let ns = namespace(&client, "rebuild-down").await;
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = cqrs_operator::Config {
        query_url_template: format!("http://127.0.0.1:{port}"),
        ..config_for(&ns)
    };
    let _op = Operator::start(client.clone(), config);
    let stacks: Api<CqrsStack> = Api::namespaced(client.clone(), &ns);
    stacks
        .create(&PostParams::default(), &sample_stack("rb"))
        .await
        .expect("create");
    wait_projection(&stacks, "initial status", |s| rebuilding(s).is_some()).await;
    stacks
        .patch(
            "rb",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"projections": {"generation": 2}}})),
        )
        .await
        .expect("bump");
    let s = wait_projection(&stacks, "QueryUnreachable", |s| {
        rebuilding(s) == Some(("True".into(), "QueryUnreachable".into()))
    })
    .await;
    // The rest of the stack is still reconciled.
    assert_eq!(
        condition(&s, "Ready").map(|c| c.1),
        Some("DeploymentsNotReady".to_owned())
    );
}

fn reconciles(op: &Operator) -> f64 {
    op.registry
        .gather()
        .iter()
        .filter(|f| f.name() == "cqrs_operator_reconciles_total")
        .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value()))
        .sum()
}

/// The operator's own status writes must not start reconciles: a running rebuild's progress and lag change on
/// every poll, and when each write triggered the next reconcile the operator re-applied every child and asked
/// query for its state in a tight loop. The rebuild is polled on its timer instead, so reconciles stay bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_rebuild_is_polled_on_its_timer_not_in_a_loop() {
    let client = client().await;
    let ns = namespace(&client, "rebuild-loop").await;
    let admin: Shared = Arc::new(Mutex::new(Admin {
        serving: 1,
        drift: true,
        ..Admin::default()
    }));
    let url = admin_server(admin.clone()).await;
    let poll = std::time::Duration::from_secs(1);
    let config = cqrs_operator::Config {
        query_url_template: url,
        rebuild_poll: poll,
        ..config_for(&ns)
    };
    let op = Operator::start(client.clone(), config);
    let stacks: Api<CqrsStack> = Api::namespaced(client.clone(), &ns);
    create_serving_1(&stacks).await;
    stacks
        .patch(
            "rb",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"projections": {"generation": 2}}})),
        )
        .await
        .unwrap();
    wait_projection(&stacks, "rebuild of 2 running", |s| {
        rebuilding(s).is_some_and(|(status, reason)| status == "True" && reason == "Running")
    })
    .await;
    // A measurement window, not a wait for a condition: count what the operator does in it.
    let window = std::time::Duration::from_secs(6);
    let (r0, g0) = (reconciles(&op), admin.lock().unwrap().gets);
    tokio::time::sleep(window).await;
    let (r1, g1) = (reconciles(&op), admin.lock().unwrap().gets);
    let lag = stacks
        .get("rb")
        .await
        .unwrap()
        .status
        .unwrap()
        .projections
        .unwrap()
        .lag;
    // One poll per second, plus a little slack for a watch event of a child; a loop makes dozens per second.
    let bound = window.as_secs_f64() / poll.as_secs_f64() + 3.0;
    assert!(
        r1 - r0 <= bound,
        "{} reconciles in {window:?} (at most {bound} with a {poll:?} poll); lag now {lag:?}",
        r1 - r0
    );
    assert!(
        (g1 - g0) as f64 <= bound,
        "{} state reads in {window:?} (at most {bound})",
        g1 - g0
    );
    // It did keep polling: the status follows the rebuild's lag.
    assert!(g1 > g0, "the running rebuild was not polled at all");
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_query_sticks_and_a_newer_serving_generation_is_not_unreachable() {
    let client = client().await;
    let ns = namespace(&client, "rebuild-owner").await;
    let admin: Shared = Arc::new(Mutex::new(Admin {
        serving: 1,
        ..Admin::default()
    }));
    let url = admin_server(admin.clone()).await;
    let config = cqrs_operator::Config {
        query_url_template: url.clone(),
        ..config_for(&ns)
    };
    let _op = Operator::start(client.clone(), config);
    let stacks: Api<CqrsStack> = Api::namespaced(client.clone(), &ns);
    stacks
        .create(&PostParams::default(), &sample_stack("rb"))
        .await
        .expect("create");
    wait_projection(&stacks, "initial status", |s| rebuilding(s).is_some()).await;
    let bump = |g: i64| {
        let stacks = stacks.clone();
        async move {
            stacks
                .patch(
                    "rb",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"projections": {"generation": g}}})),
                )
                .await
        }
    };
    bump(2).await.expect("bump");
    wait_projection(&stacks, "rebuild 2 running", |s| {
        rebuilding(s) == Some(("True".into(), "Running".into()))
    })
    .await;

    // Someone cancels generation 2 through query's admin API: the operator reports it and does not restart it.
    let r = reqwest::Client::new()
        .delete(format!("{url}/admin/projections/rebuild"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    wait_projection(&stacks, "RebuildCancelled", |s| {
        rebuilding(s) == Some(("False".into(), "RebuildCancelled".into()))
    })
    .await;
    let seen = admin.lock().unwrap().gets;
    wait_for("three more operator polls", TIMEOUT, || async {
        (admin.lock().unwrap().gets >= seen + 3).then_some(())
    })
    .await;
    assert_eq!(
        admin.lock().unwrap().posts,
        vec![2],
        "the cancel was undone"
    );
    let s = stacks.get("rb").await.unwrap();
    assert_eq!(
        rebuilding(&s),
        Some(("False".into(), "RebuildCancelled".into()))
    );

    // Query serves a generation newer than the spec (rebuilt through its admin API): reported as such, and
    // no start is tried that query must refuse.
    admin.lock().unwrap().serving = 5;
    let s = wait_projection(&stacks, "ServingNewerThanSpec", |s| {
        rebuilding(s) == Some(("False".into(), "ServingNewerThanSpec".into()))
    })
    .await;
    assert_eq!(
        s.status
            .as_ref()
            .and_then(|st| st.projections.as_ref())
            .and_then(|p| p.serving),
        Some(5)
    );
    assert_eq!(admin.lock().unwrap().posts, vec![2]);
    // A spec past it brings the two together again: 6 is started.
    bump(6).await.expect("bump to 6");
    wait_projection(&stacks, "rebuild 6 running", |s| {
        rebuilding(s) == Some(("True".into(), "Running".into()))
    })
    .await;
    assert_eq!(admin.lock().unwrap().posts, vec![2, 6]);
}
