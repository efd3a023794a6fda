//! The controller against a real kube-apiserver + etcd (no kubelet: Deployment status is patched by the test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use k8s_openapi::api::{
    apps::v1::Deployment,
    autoscaling::v2::HorizontalPodAutoscaler,
    core::v1::{ConfigMap, Service},
    events::v1::Event,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use support::*;

use cqrs_operator::{
    build::{kafka_topic_resource, service_monitor_resource},
    crd::CqrsStack,
};

const NAMES: [&str; 3] = ["gateway", "mutation", "query"];
const TOPIC_SUFFIXES: [&str; 4] = ["users", "products", "orders", "dlq"];

fn topics_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &kafka_topic_resource())
}

async fn wait_condition(
    api: &Api<CqrsStack>,
    name: &str,
    type_: &str,
    status: &str,
    reason: Option<&str>,
) -> CqrsStack {
    let last = std::sync::Mutex::new(None);
    let what = format!("{name} {type_}={status} {reason:?}");
    let guard = PrintOnPanic(&last);
    let r = wait_for(&what, TIMEOUT, || async {
        let s = api.get(name).await.ok()?;
        *last.lock().unwrap() = Some(format!("{what}: last status {:?}", s.status));
        let (st, re, _) = condition(&s, type_)?;
        (st == status && reason.is_none_or(|r| r == re)).then_some(s)
    })
    .await;
    std::mem::forget(guard);
    r
}

/// Prints the last observed status when a wait times out, so a failure says what the operator reported.
struct PrintOnPanic<'a>(&'a std::sync::Mutex<Option<String>>);
impl Drop for PrintOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(g) = self.0.lock()
        {
            eprintln!("{}", g.as_deref().unwrap_or("no status observed"));
        }
    }
}

async fn warning_events(client: &Client, ns: &str, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some(reason))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_builds_every_child_with_owner_references() {
    let client = client().await;
    let ns = namespace(&client, "create").await;
    let op = Operator::start(client.clone(), config_for(&ns));
    let stacks: Api<CqrsStack> = Api::namespaced(client.clone(), &ns);
    let created = stacks
        .create(&PostParams::default(), &sample_stack("shop"))
        .await
        .expect("create");
    let uid = created.uid().expect("uid");
    // Status is written after every child was applied: from here on all of them exist.
    let stack = wait_condition(
        &stacks,
        "shop",
        "Ready",
        "False",
        Some("DeploymentsNotReady"),
    )
    .await;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    for c in NAMES {
        let d = wait_for(&format!("deployment shop-{c}"), TIMEOUT, || async {
            deployments
                .get_opt(&format!("shop-{c}"))
                .await
                .ok()
                .flatten()
        })
        .await;
        let owner = &d.owner_references()[0];
        assert_eq!(
            (owner.uid.as_str(), owner.kind.as_str(), owner.controller),
            (uid.as_str(), "CqrsStack", Some(true))
        );
        let spec = d.spec.expect("spec");
        assert_eq!(spec.replicas, Some(if c == "gateway" { 2 } else { 1 }));
        let pod = spec.template.spec.expect("pod spec");
        let container = &pod.containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some(format!("cqrs/{c}:test").as_str())
        );
        let sc = container
            .security_context
            .as_ref()
            .expect("securityContext");
        assert_eq!(
            (
                sc.run_as_non_root,
                sc.read_only_root_filesystem,
                sc.allow_privilege_escalation
            ),
            (Some(true), Some(true), Some(false))
        );
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()])
        );
        assert_eq!(
            container
                .readiness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.as_deref()),
            Some("/readyz")
        );
        assert_eq!(
            container
                .liveness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.as_deref()),
            Some("/healthz")
        );
    }
    let mutation = deployments.get("shop-mutation").await.expect("mutation");
    let env = mutation.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    let db = env
        .iter()
        .find(|e| e.name == "DATABASE_URL")
        .expect("DATABASE_URL");
    let sel = db
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!((sel.name.as_str(), sel.key.as_str()), ("pg", "url"));

    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    for (c, port) in NAMES.iter().zip([3123, 3124, 3125]) {
        let s = services.get(&format!("shop-{c}")).await.expect("service");
        assert_eq!(s.owner_references()[0].uid, uid);
        assert_eq!(s.spec.unwrap().ports.unwrap()[0].port, port);
        let p = pdbs.get(&format!("shop-{c}")).await.expect("pdb");
        assert_eq!(p.owner_references()[0].uid, uid);
    }
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("shop-config")
        .await
        .expect("configmap");
    assert_eq!(cm.owner_references()[0].uid, uid);
    let data = cm.data.unwrap();
    assert_eq!(data["KAFKA_BOOTSTRAP"], "kafka:9092");
    assert_eq!(data["TOPIC_PREFIX"], "shop");
    assert_eq!(data["MONGO_DB"], "reads");
    assert_eq!(data["QUERY_URL"], "http://shop-query:3125");

    let topics = topics_api(&client, &ns);
    for t in TOPIC_SUFFIXES {
        let topic = topics.get(&format!("shop.{t}")).await.expect("topic");
        assert_eq!(topic.owner_references()[0].uid, uid);
        assert_eq!(topic.labels()["strimzi.io/cluster"], "events");
        assert_eq!(topic.data["spec"]["partitions"], 6);
        assert_eq!(topic.data["spec"]["replicas"], 1);
        assert_eq!(topic.data["spec"]["topicName"], format!("shop.{t}"));
        assert_eq!(topic.data["spec"]["config"]["retention.ms"], "-1");
    }

    assert!(stack.finalizers().iter().any(|f| f == "cqrs.dev/cleanup"));
    let status = stack.status.unwrap();
    assert_eq!(status.observed_generation, stack.metadata.generation);
    assert_eq!(status.replicas.unwrap().gateway, "0/2");
    assert_eq!(
        condition_of(&status.conditions, "TopicsReady"),
        Some(("False".into(), "TopicsNotReady".into()))
    );
    assert_eq!(
        condition_of(&status.conditions, "QueryParallelism"),
        Some(("True".into(), "Sufficient".into()))
    );
    assert_eq!(status.projections.and_then(|p| p.serving), Some(1));
    assert!(op.metric("cqrs_operator_reconciles_total") >= 1.0);
    assert!(op.metric("cqrs_operator_reconcile_duration_seconds") >= 1.0);
    op.stop().await;
}

fn condition_of(
    cs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> Option<(String, String)> {
    cs.iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_autoscaling_and_monitoring_follow_the_spec() {
    let client = client().await;
    let ns = namespace(&client, "scale").await;
    let _op = Operator::start(client.clone(), config_for(&ns));
    let stacks: Api<CqrsStack> = Api::namespaced(client.clone(), &ns);
    stacks
        .create(&PostParams::default(), &sample_stack("s"))
        .await
        .expect("create");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let replicas = |name: &'static str, want: Option<i32>| {
        let deployments = deployments.clone();
        async move {
            wait_for(&format!("{name} replicas {want:?}"), TIMEOUT, || async {
                let d = deployments.get_opt(name).await.ok()??;
                (d.spec?.replicas == want).then_some(())
            })
            .await
        }
    };
    replicas("s-query", Some(1)).await;
    let pp = PatchParams::default();
    stacks
        .patch(
            "s",
            &pp,
            &Patch::Merge(json!({"spec": {"query": {"replicas": 4}}})),
        )
        .await
        .expect("scale");
    replicas("s-query", Some(4)).await;

    // Query replicas beyond the partition count: a warning condition, the stack still reconciles.
    stacks
        .patch(
            "s",
            &pp,
            &Patch::Merge(json!({"spec": {"query": {"replicas": 8}}})),
        )
        .await
        .expect("scale");
    replicas("s-query", Some(8)).await;
    wait_condition(
        &stacks,
        "s",
        "QueryParallelism",
        "False",
        Some("QueryReplicasExceedPartitions"),
    )
    .await;

    // Autoscaling: an HPA owns the count and the Deployment no longer pins replicas.
    stacks
        .patch(
            "s",
            &pp,
            &Patch::Merge(
                json!({"spec": {"query": {"autoscaling": {"minReplicas": 2, "maxReplicas": 5}}}}),
            ),
        )
        .await
        .expect("autoscale");
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
    let hpa = wait_for("hpa", TIMEOUT, || async {
        hpas.get_opt("s-query").await.ok().flatten()
    })
    .await;
    let spec = hpa.spec.unwrap();
    assert_eq!(
        (
            spec.min_replicas,
            spec.max_replicas,
            spec.scale_target_ref.name.as_str()
        ),
        (Some(2), 5, "s-query")
    );
    stacks
        .patch(
            "s",
            &pp,
            &Patch::Merge(json!({"spec": {"query": {"autoscaling": null}}})),
        )
        .await
        .expect("no autoscale");
    wait_for("hpa deleted", TIMEOUT, || async {
        hpas.get_opt("s-query")
            .await
            .ok()
            .flatten()
            .is_none()
            .then_some(())
    })
    .await;

    // ServiceMonitor on, then off.
    let sms: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &service_monitor_resource());
    stacks
        .patch(
            "s",
            &pp,
            &Patch::Merge(
                json!({"spec": {"monitoring": {"serviceMonitor": true, "interval": "15s"}}}),
            ),
        )
        .await
        .expect("monitor");
    let sm = wait_for("servicemonitor", TIMEOUT, || async {
        sms.get_opt("s").await.ok().flatten()
    })
    .await;
    assert_eq!(sm.data["spec"]["endpoints"][0]["interval"], "15s");
    assert_eq!(sm.data["spec"]["endpoints"][0]["path"], "/metrics");
    stacks
        .patch(
            "s",
            &pp,
            &Patch::Merge(json!({"spec": {"monitoring": {"serviceMonitor": false}}})),
        )
        .await
        .expect("no monitor");
    wait_for("servicemonitor deleted", TIMEOUT, || async {
        sms.get_opt("s")
            .await
            .ok()
            .flatten()
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_grow_but_never_shrink() {
    let client = client().await;
    let ns = namespace(&client, "parts").await;
    let _op = Operator::start(client.clone(), config_for(&ns));
    let stacks: Api<CqrsStack> = Api::namespaced(client.clone(), &ns);
    stacks
        .create(&PostParams::default(), &sample_stack("p"))
        .await
        .expect("create");
    let topics = topics_api(&client, &ns);
    let partitions = |want: i64| {
        let topics = topics.clone();
        async move {
            wait_for(
                &format!("all topics at {want} partitions"),
                TIMEOUT,
                || async {
                    for t in TOPIC_SUFFIXES {
                        let topic = topics.get_opt(&format!("shop.{t}")).await.ok()??;
                        if topic.data["spec"]["partitions"] != want {
                            return None;
                        }
                    }
                    Some(())
                },
            )
            .await
        }
    };
    partitions(6).await;
    stacks
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"kafka": {"partitions": 8}}})),
        )
        .await
        .expect("raise");
    partitions(8).await;

    // Lowering the spec is refused by the API server (CEL transition rule).
    let err = stacks
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"kafka": {"partitions": 3}}})),
        )
        .await
        .expect_err("decrease must be rejected");
    assert!(
        err.to_string()
            .contains("kafka.partitions cannot be decreased"),
        "{err}"
    );

    // A topic that already has more partitions than the spec (raised by hand): the operator refuses to apply
    // the lower number, says why in a condition and a Warning Event.
    topics
        .patch("shop.orders", &PatchParams::apply("someone-else").force(), &Patch::Apply(json!({
            "apiVersion": "kafka.strimzi.io/v1", "kind": "KafkaTopic", "spec": {"partitions": 12}
        })))
        .await
        .expect("raise by hand");
    // Any spec change triggers a reconcile; the operator must not push 12 back down to 8.
    stacks
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"gateway": {"replicas": 3}}})),
        )
        .await
        .expect("touch");
    let stack = wait_condition(
        &stacks,
        "p",
        "TopicsReady",
        "False",
        Some("PartitionsDecrease"),
    )
    .await;
    let (ready, reason, message) = condition(&stack, "Ready").unwrap();
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "PartitionsDecrease")
    );
    assert!(message.contains("shop.orders has 12"), "{message}");
    assert_eq!(
        topics.get("shop.orders").await.unwrap().data["spec"]["partitions"],
        12
    );
    wait_for("PartitionsDecrease warning event", TIMEOUT, || async {
        (!warning_events(&client, &ns, "PartitionsDecrease")
            .await
            .is_empty())
        .then_some(())
    })
    .await;
    // Raising the spec to the topic's size resolves it.
    stacks
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"kafka": {"partitions": 12}}})),
        )
        .await
        .expect("raise");
    partitions(12).await;
    wait_condition(&stacks, "p", "TopicsReady", "False", Some("TopicsNotReady")).await;
}

async fn mark_deployment_ready(client: &Client, ns: &str, name: &str) {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let d = api.get(name).await.expect("deployment");
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = json!({"status": {
        "observedGeneration": d.metadata.generation, "replicas": replicas, "readyReplicas": replicas,
        "availableReplicas": replicas, "updatedReplicas": replicas
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .expect("deployment status");
}

async fn mark_topic_ready(client: &Client, ns: &str, name: &str) {
    let api = topics_api(client, ns);
    let t = api.get(name).await.expect("topic");
    let status = json!({"status": {
        "observedGeneration": t.metadata.generation, "topicName": name,
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .expect("topic status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_when_deployments_and_topics_are_ready() {
    let client = client().await;
    let ns = namespace(&client, "ready").await;
    let _op = Operator::start(client.clone(), config_for(&ns));
    let stacks: Api<CqrsStack> = Api::namespaced(client.clone(), &ns);
    stacks
        .create(&PostParams::default(), &sample_stack("r"))
        .await
        .expect("create");
    wait_condition(&stacks, "r", "Ready", "False", Some("DeploymentsNotReady")).await;
    for c in NAMES {
        mark_deployment_ready(&client, &ns, &format!("r-{c}")).await;
    }
    let stack = wait_condition(&stacks, "r", "DeploymentsReady", "True", None).await;
    assert_eq!(
        condition(&stack, "Ready").map(|c| c.1),
        Some("TopicsNotReady".to_owned())
    );
    for t in TOPIC_SUFFIXES {
        mark_topic_ready(&client, &ns, &format!("shop.{t}")).await;
    }
    let stack = wait_condition(&stacks, "r", "Ready", "True", Some("Ready")).await;
    let replicas = stack.status.unwrap().replicas.unwrap();
    assert_eq!(
        (
            replicas.gateway.as_str(),
            replicas.mutation.as_str(),
            replicas.query.as_str()
        ),
        ("2/2", "1/1", "1/1")
    );

    // Scaling up makes the Deployment unready again until its pods report in.
    stacks
        .patch(
            "r",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"mutation": {"replicas": 2}}})),
        )
        .await
        .expect("scale");
    wait_condition(&stacks, "r", "Ready", "False", Some("DeploymentsNotReady")).await;
    mark_deployment_ready(&client, &ns, "r-mutation").await;
    wait_condition(&stacks, "r", "Ready", "True", Some("Ready")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_rejected_by_cel_on_the_server() {
    let client = client().await;
    let ns = namespace(&client, "cel").await;
    let stacks: Api<CqrsStack> = Api::namespaced(client.clone(), &ns);
    let cases = [
        (
            json!({"kafka": {"bootstrapServers": "k:9092", "topicMode": "strimzi"}}),
            "kafka.strimziCluster is required",
        ),
        (
            json!({"kafka": {"bootstrapServers": "k:9092", "strimziCluster": "c", "topicPrefix": "Bad_Prefix"}}),
            "kafka.topicPrefix must be lowercase",
        ),
        (
            json!({"query": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}),
            "autoscaling.minReplicas must not exceed",
        ),
    ];
    for (i, (patch, message)) in cases.into_iter().enumerate() {
        let mut stack = serde_json::to_value(sample_stack(&format!("bad{i}"))).unwrap();
        for (k, v) in patch.as_object().unwrap() {
            stack["spec"][k] = v.clone();
        }
        let stack: CqrsStack = serde_json::from_value(stack).unwrap();
        let err = stacks
            .create(&PostParams::default(), &stack)
            .await
            .expect_err(message);
        assert!(
            err.to_string().contains(message),
            "expected {message:?} in {err}"
        );
    }
    // Transition rule: generation only grows.
    let mut good = sample_stack("good");
    good.spec.projections.generation = 3;
    stacks
        .create(&PostParams::default(), &good)
        .await
        .expect("create");
    let err = stacks
        .patch(
            "good",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"projections": {"generation": 2}}})),
        )
        .await
        .expect_err("generation decrease");
    assert!(
        err.to_string()
            .contains("projections.generation can only increase"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_spec_the_server_cannot_catch_sets_ready_false_and_one_warning() {
    let client = client().await;
    let ns = namespace(&client, "invalid").await;
    let op = Operator::start(client.clone(), config_for(&ns));
    let stacks: Api<CqrsStack> = Api::namespaced(client.clone(), &ns);
    let mut stack = serde_json::to_value(sample_stack("inv")).unwrap();
    stack["spec"]["query"]["resources"] =
        json!({"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}});
    stacks
        .create(
            &PostParams::default(),
            &serde_json::from_value(stack).unwrap(),
        )
        .await
        .expect("create");
    let stack = wait_condition(&stacks, "inv", "Ready", "False", Some("InvalidSpec")).await;
    let (_, _, message) = condition(&stack, "Ready").unwrap();
    assert!(
        message.contains("spec.query.resources.requests.memory"),
        "{message}"
    );
    let events = wait_for("InvalidSpec warning", TIMEOUT, || async {
        let e = warning_events(&client, &ns, "InvalidSpec").await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(events.len(), 1, "one event, not one per reconcile");
    // Nothing was built from the invalid spec.
    assert!(
        Api::<Deployment>::namespaced(client.clone(), &ns)
            .get_opt("inv-query")
            .await
            .unwrap()
            .is_none()
    );
    // No failure was counted: an invalid spec is not an error to retry.
    assert_eq!(op.metric("cqrs_operator_reconcile_failures_total"), 0.0);

    // Fixing the spec recovers.
    stacks
        .patch(
            "inv",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"query": {"resources": {"limits": {"memory": "4Gi"}}}}})),
        )
        .await
        .expect("fix");
    wait_condition(
        &stacks,
        "inv",
        "Ready",
        "False",
        Some("DeploymentsNotReady"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_runs_the_finalizer_and_retains_topics() {
    let client = client().await;
    let ns = namespace(&client, "delete").await;
    let _op = Operator::start(client.clone(), config_for(&ns));
    let stacks: Api<CqrsStack> = Api::namespaced(client.clone(), &ns);
    let mut keep = sample_stack("keep");
    keep.spec.kafka.topic_prefix = "keep".into();
    let mut gone = sample_stack("gone");
    gone.spec.kafka.topic_prefix = "gone".into();
    gone.spec.kafka.deletion_policy = cqrs_operator::crd::DeletionPolicy::Delete;
    let keep_uid = stacks
        .create(&PostParams::default(), &keep)
        .await
        .expect("create")
        .uid()
        .unwrap();
    let gone_uid = stacks
        .create(&PostParams::default(), &gone)
        .await
        .expect("create")
        .uid()
        .unwrap();
    for s in ["keep", "gone"] {
        wait_for(&format!("{s} finalizer and topics"), TIMEOUT, || async {
            let st = stacks.get(s).await.ok()?;
            let has = st.finalizers().iter().any(|f| f == "cqrs.dev/cleanup");
            let topic = topics_api(&client, &ns)
                .get_opt(&format!("{s}.dlq"))
                .await
                .ok()??;
            (has && !topic.owner_references().is_empty()).then_some(())
        })
        .await;
    }
    for s in ["keep", "gone"] {
        stacks.delete(s, &Default::default()).await.expect("delete");
        // The object disappears only after the operator's cleanup removed the finalizer.
        wait_for(&format!("{s} deleted"), TIMEOUT, || async {
            stacks.get_opt(s).await.ok()?.is_none().then_some(())
        })
        .await;
    }
    let topics = topics_api(&client, &ns);
    for t in TOPIC_SUFFIXES {
        let kept = topics
            .get(&format!("keep.{t}"))
            .await
            .expect("retained topic");
        assert!(
            kept.owner_references().iter().all(|o| o.uid != keep_uid),
            "Retain orphans the topic"
        );
        let doomed = topics
            .get(&format!("gone.{t}"))
            .await
            .expect("topic until GC");
        assert!(
            doomed.owner_references().iter().any(|o| o.uid == gone_uid),
            "Delete leaves it to the garbage collector"
        );
    }
    // No garbage collector runs here: the children still carry the owner references GC acts on.
    let d = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("keep-query")
        .await
        .expect("deployment");
    assert_eq!(d.owner_references()[0].uid, keep_uid);
    assert_eq!(d.owner_references()[0].block_owner_deletion, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_serves_health_and_metrics_binary() {
    // The real binary: starts against the test API server, answers /healthz, /readyz, /metrics and stops on SIGTERM.
    let client = client().await;
    let ns = namespace(&client, "bin").await;
    let kubeconfig = tokio::task::spawn_blocking(|| cluster().kubeconfig.clone())
        .await
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_operator"))
        .env("KUBECONFIG", &kubeconfig)
        .env("OPERATOR_LISTEN", format!("127.0.0.1:{port}"))
        .env("WATCH_NAMESPACE", &ns)
        .env("LOG_FORMAT", "json")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn operator");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_for("operator /readyz", TIMEOUT, || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    assert!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let stacks: Api<CqrsStack> = Api::namespaced(client.clone(), &ns);
    stacks
        .create(&PostParams::default(), &sample_stack("b"))
        .await
        .expect("create");
    wait_condition(&stacks, "b", "Ready", "False", None).await;
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("cqrs_operator_reconciles_total{result=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cqrs_operator_reconcile_duration_seconds_bucket"),
        "{metrics}"
    );
    let pid = child.id().expect("pid");
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait())
        .await
        .expect("exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_topic_mode_creates_no_kafka_topics_and_can_be_ready() {
    let client = client().await;
    let ns = namespace(&client, "direct").await;
    let _op = Operator::start(client.clone(), config_for(&ns));
    let stacks: Api<CqrsStack> = Api::namespaced(client.clone(), &ns);
    let mut stack = sample_stack("d");
    stack.spec.kafka.topic_mode = cqrs_operator::crd::TopicMode::Direct;
    stack.spec.kafka.strimzi_cluster = None;
    stacks
        .create(&PostParams::default(), &stack)
        .await
        .expect("create");
    let s = wait_condition(
        &stacks,
        "d",
        "TopicsReady",
        "Unknown",
        Some("CreatedByMutation"),
    )
    .await;
    assert_eq!(
        condition(&s, "Ready").map(|c| c.1),
        Some("DeploymentsNotReady".to_owned())
    );
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("d-config")
        .await
        .unwrap();
    assert_eq!(cm.data.unwrap()["CREATE_TOPICS"], "true");
    for c in NAMES {
        mark_deployment_ready(&client, &ns, &format!("d-{c}")).await;
    }
    wait_condition(&stacks, "d", "Ready", "True", Some("Ready")).await;
    let topics = topics_api(&client, &ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(
        topics.items.is_empty(),
        "direct mode leaves topics to the mutation service"
    );
}
