//! Unit tests of the pure steps: validate and build, field by field. No cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use cqrs_operator::{
    build::{Child, Desired, build, config_hash},
    crd::{CqrsStackSpec, DeletionPolicy},
    validate::{parse_quantity, validate},
};
use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Container},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use serde_json::{Value, json};

fn spec_json() -> Value {
    json!({
        "images": {"gateway": "reg/gw:1", "mutation": "reg/mu:1", "query": "reg/qu:1", "pullPolicy": "IfNotPresent"},
        "gateway": {"replicas": 2, "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}}},
        "mutation": {"replicas": 3},
        "query": {"replicas": 4, "autoscaling": {"minReplicas": 2, "maxReplicas": 6, "targetCpuUtilizationPercentage": 70}},
        "postgres": {"secretName": "pg-secret", "key": "dsn"},
        "mongo": {"secretName": "mongo-secret", "database": "reads"},
        "auth": {"secretName": "auth-secret"},
        "kafka": {"bootstrapServers": "k:9092", "strimziCluster": "events", "topicPrefix": "shop", "partitions": 12,
                  "replicas": 3, "config": {"min.insync.replicas": "2"}},
        "projections": {"generation": 7},
        "monitoring": {"serviceMonitor": true, "interval": "15s"}
    })
}

fn spec(v: Value) -> CqrsStackSpec {
    serde_json::from_value(v).expect("spec")
}

fn desired(v: Value) -> Desired {
    Desired {
        name: "shop".into(),
        namespace: "prod".into(),
        owner: OwnerReference {
            api_version: "cqrs.dev/v1alpha1".into(),
            kind: "CqrsStack".into(),
            name: "shop".into(),
            uid: "uid-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        },
        spec: validate("shop", &spec(v)).expect("valid"),
    }
}

fn deployment(children: &[Child], name: &str) -> Deployment {
    children
        .iter()
        .find_map(|c| match c {
            Child::Deployment(d) if d.metadata.name.as_deref() == Some(name) => Some(d.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("deployment {name}"))
}

fn container(d: &Deployment) -> Container {
    d.spec.clone().unwrap().template.spec.unwrap().containers[0].clone()
}

fn kinds(children: &[Child]) -> Vec<(String, String)> {
    children
        .iter()
        .map(|c| (c.kind().to_owned(), c.name()))
        .collect()
}

#[test]
fn builds_every_object_with_owner_and_labels() {
    let children = build(&desired(spec_json()));
    let got = kinds(&children);
    let want: Vec<(String, String)> = [
        ("ConfigMap", "shop-config"),
        ("Deployment", "shop-gateway"),
        ("Service", "shop-gateway"),
        ("PodDisruptionBudget", "shop-gateway"),
        ("Deployment", "shop-mutation"),
        ("Service", "shop-mutation"),
        ("PodDisruptionBudget", "shop-mutation"),
        ("Deployment", "shop-query"),
        ("Service", "shop-query"),
        ("PodDisruptionBudget", "shop-query"),
        ("HorizontalPodAutoscaler", "shop-query"),
        ("KafkaTopic", "shop.users"),
        ("KafkaTopic", "shop.products"),
        ("KafkaTopic", "shop.orders"),
        ("KafkaTopic", "shop.dlq"),
        ("ServiceMonitor", "shop"),
    ]
    .iter()
    .map(|(k, n)| ((*k).to_owned(), (*n).to_owned()))
    .collect();
    assert_eq!(got, want);
    for c in &children {
        let v = match c {
            Child::ConfigMap(o) => serde_json::to_value(o),
            Child::Deployment(o) => serde_json::to_value(o),
            Child::Service(o) => serde_json::to_value(o),
            Child::PodDisruptionBudget(o) => serde_json::to_value(o),
            Child::HorizontalPodAutoscaler(o) => serde_json::to_value(o),
            Child::KafkaTopic(o) | Child::ServiceMonitor(o) => serde_json::to_value(o),
        }
        .unwrap();
        assert_eq!(v["metadata"]["namespace"], "prod", "{}", c.name());
        assert_eq!(
            v["metadata"]["ownerReferences"][0]["uid"],
            "uid-1",
            "{}",
            c.name()
        );
        assert_eq!(v["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(
            v["metadata"]["labels"]["app.kubernetes.io/instance"],
            "shop"
        );
        assert_eq!(
            v["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "cqrs-operator"
        );
        assert!(
            v["apiVersion"].is_string() && v["kind"].is_string(),
            "apply needs apiVersion/kind: {}",
            c.name()
        );
    }
}

#[test]
fn replicas_images_pull_policy_and_resources() {
    let children = build(&desired(spec_json()));
    let gw = deployment(&children, "shop-gateway");
    assert_eq!(gw.spec.as_ref().unwrap().replicas, Some(2));
    assert_eq!(
        deployment(&children, "shop-mutation")
            .spec
            .unwrap()
            .replicas,
        Some(3)
    );
    // Autoscaled: replicas left to the HPA.
    assert_eq!(
        deployment(&children, "shop-query").spec.unwrap().replicas,
        None
    );
    let c = container(&gw);
    assert_eq!(c.image.as_deref(), Some("reg/gw:1"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    let r = c.resources.unwrap();
    assert_eq!(r.requests.unwrap()["cpu"].0, "100m");
    assert_eq!(r.limits.unwrap()["memory"].0, "256Mi");
    assert_eq!(
        container(&deployment(&children, "shop-mutation"))
            .image
            .as_deref(),
        Some("reg/mu:1")
    );
    assert_eq!(
        container(&deployment(&children, "shop-query"))
            .image
            .as_deref(),
        Some("reg/qu:1")
    );
    assert!(
        container(&deployment(&children, "shop-mutation"))
            .resources
            .is_none()
    );
}

#[test]
fn autoscaling_becomes_an_hpa() {
    let children = build(&desired(spec_json()));
    let hpa = children
        .iter()
        .find_map(|c| match c {
            Child::HorizontalPodAutoscaler(h) => Some(h.clone()),
            _ => None,
        })
        .unwrap();
    let s = hpa.spec.unwrap();
    assert_eq!((s.min_replicas, s.max_replicas), (Some(2), 6));
    assert_eq!(s.scale_target_ref.name, "shop-query");
    let m = &s.metrics.unwrap()[0];
    assert_eq!(
        m.resource.as_ref().unwrap().target.average_utilization,
        Some(70)
    );
}

#[test]
fn probes_ports_and_restricted_security_context() {
    let children = build(&desired(spec_json()));
    for (name, port) in [
        ("shop-gateway", 3123),
        ("shop-mutation", 3124),
        ("shop-query", 3125),
    ] {
        let d = deployment(&children, name);
        let pod = d.spec.clone().unwrap().template.spec.unwrap();
        let c = container(&d);
        assert_eq!(c.ports.as_ref().unwrap()[0].container_port, port);
        let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
            p.as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .clone()
                .unwrap()
        };
        assert_eq!(path(&c.readiness_probe), "/readyz");
        assert_eq!(path(&c.liveness_probe), "/healthz");
        assert_eq!(path(&c.startup_probe), "/healthz");
        let sc = c.security_context.unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        assert_eq!(pod.automount_service_account_token, Some(false));
        // A writable /tmp on a read-only root.
        assert_eq!(c.volume_mounts.unwrap()[0].mount_path, "/tmp");
        let selector = d.spec.unwrap().selector.match_labels.unwrap();
        assert_eq!(selector["app.kubernetes.io/instance"], "shop");
    }
}

#[test]
fn configuration_and_secrets_reach_the_right_service() {
    let children = build(&desired(spec_json()));
    let cm = config_map(&children);
    let want = BTreeMap::from(
        [
            ("LOG_FORMAT", "json"),
            ("GATEWAY_LISTEN", "0.0.0.0:3123"),
            ("MUTATION_LISTEN", "0.0.0.0:3124"),
            ("QUERY_LISTEN", "0.0.0.0:3125"),
            ("MUTATION_URL", "http://shop-mutation:3124"),
            ("QUERY_URL", "http://shop-query:3125"),
            ("KAFKA_BOOTSTRAP", "k:9092"),
            ("TOPIC_PREFIX", "shop"),
            ("MONGO_DB", "reads"),
            ("PROJECTION_GENERATION", "7"),
            ("CREATE_TOPICS", "false"),
            ("TOPIC_PARTITIONS", "12"),
            ("TOPIC_REPLICATION", "3"),
            ("SHUTDOWN_TIMEOUT_SECS", "20"),
            ("GATEWAY_DRAIN_TIMEOUT", "20s"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    assert_eq!(cm, want);
    for name in ["shop-gateway", "shop-mutation", "shop-query"] {
        let c = container(&deployment(&children, name));
        let from = c.env_from.unwrap();
        assert_eq!(from[0].config_map_ref.as_ref().unwrap().name, "shop-config");
    }
    let gw = container(&deployment(&children, "shop-gateway"));
    assert_eq!(
        gw.env_from.as_ref().unwrap()[1]
            .secret_ref
            .as_ref()
            .unwrap()
            .name,
        "auth-secret"
    );
    let secret = |c: &Container, var: &str| {
        let e = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == var)
            .unwrap()
            .clone();
        let s = e.value_from.unwrap().secret_key_ref.unwrap();
        (s.name, s.key)
    };
    let mu = container(&deployment(&children, "shop-mutation"));
    assert_eq!(
        secret(&mu, "DATABASE_URL"),
        ("pg-secret".to_owned(), "dsn".to_owned())
    );
    let qu = container(&deployment(&children, "shop-query"));
    assert_eq!(
        secret(&qu, "MONGO_URL"),
        ("mongo-secret".to_owned(), "url".to_owned())
    );
    // Dynamic group membership: a static member (QUERY_INSTANCE_ID) would not leave the group when a rolling
    // update replaces its pod, and its partitions would stall for the session timeout.
    assert!(
        qu.env
            .as_ref()
            .unwrap()
            .iter()
            .all(|e| e.name != "QUERY_INSTANCE_ID"),
        "query pods must not be static group members"
    );
    // Every container keeps serving through a preStop sleep before SIGTERM, inside the grace period.
    for c in [&gw, &mu, &qu] {
        let sleep = c
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|p| p.sleep.as_ref())
            .map(|s| s.seconds);
        assert_eq!(sleep, Some(cqrs_operator::build::PRE_STOP_SECONDS));
    }
    // The pod's grace period covers the preStop sleep and the shutdown budget (the budget is what the
    // ConfigMap passes on; the grace period is what the pod spec says).
    let grace = deployment(&children, "shop-gateway")
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .termination_grace_period_seconds
        .unwrap();
    let budget: i64 = config_map(&children)["SHUTDOWN_TIMEOUT_SECS"]
        .parse()
        .unwrap();
    assert!(
        cqrs_operator::build::PRE_STOP_SECONDS + budget < grace,
        "{budget} + preStop < {grace}"
    );
    assert!(
        mu.env.unwrap().iter().all(|e| e.name != "MONGO_URL"),
        "each service gets only its own secrets"
    );
}

#[test]
fn config_hash_rolls_pods_on_config_change_but_not_on_generation_bump() {
    let base = build(&desired(spec_json()));
    let hash = |children: &[Child]| {
        deployment(children, "shop-query")
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()["cqrs.dev/config-hash"]
            .clone()
    };
    let mut bumped = spec_json();
    bumped["projections"]["generation"] = json!(8);
    assert_eq!(hash(&base), hash(&build(&desired(bumped))));
    let mut moved = spec_json();
    moved["kafka"]["bootstrapServers"] = json!("other:9092");
    assert_ne!(hash(&base), hash(&build(&desired(moved))));
    assert_eq!(config_hash(&BTreeMap::new()).len(), 16);
}

#[test]
fn kafka_topics_strimzi_mode() {
    let children = build(&desired(spec_json()));
    let topics: Vec<Value> = children
        .iter()
        .filter_map(|c| match c {
            Child::KafkaTopic(t) => Some(serde_json::to_value(t).unwrap()),
            _ => None,
        })
        .collect();
    assert_eq!(topics.len(), 4);
    for t in &topics {
        assert_eq!(t["apiVersion"], "kafka.strimzi.io/v1");
        assert_eq!(t["kind"], "KafkaTopic");
        assert_eq!(t["metadata"]["labels"]["strimzi.io/cluster"], "events");
        assert_eq!(t["spec"]["topicName"], t["metadata"]["name"]);
        assert_eq!(t["spec"]["partitions"], 12);
        assert_eq!(t["spec"]["replicas"], 3);
        assert_eq!(
            t["spec"]["config"]["retention.ms"], "-1",
            "events are kept forever by default"
        );
        assert_eq!(t["spec"]["config"]["retention.bytes"], "-1");
        assert_eq!(t["spec"]["config"]["min.insync.replicas"], "2");
    }
    // A user-set retention wins.
    let mut v = spec_json();
    v["kafka"]["config"] = json!({"retention.ms": "604800000"});
    let children = build(&desired(v));
    let t = children.iter().find_map(|c| match c {
        Child::KafkaTopic(t) => Some(t.data.clone()),
        _ => None,
    });
    assert_eq!(t.unwrap()["spec"]["config"]["retention.ms"], "604800000");
}

#[test]
fn direct_mode_and_no_monitoring_build_no_topics_or_servicemonitor() {
    let mut v = spec_json();
    v["kafka"]["topicMode"] = json!("direct");
    v["monitoring"] = json!({"serviceMonitor": false});
    v["query"] = json!({"replicas": 2});
    let children = build(&desired(v));
    let cm = children.iter().find_map(|c| match c {
        Child::ConfigMap(c) => c.data.clone(),
        _ => None,
    });
    let cm = cm.unwrap();
    assert_eq!(
        cm["CREATE_TOPICS"], "true",
        "in direct mode mutation creates the topics"
    );
    // ... with the configuration strimzi mode's KafkaTopics carry (replicas 3 in spec_json).
    let topic_config: BTreeMap<String, String> = serde_json::from_str(&cm["TOPIC_CONFIG"]).unwrap();
    assert_eq!(
        topic_config,
        BTreeMap::from(
            [
                ("retention.ms", "-1"),
                ("retention.bytes", "-1"),
                ("min.insync.replicas", "2"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        )
    );
    let got = kinds(&children);
    assert!(
        got.iter().all(|(k, _)| k != "KafkaTopic"
            && k != "ServiceMonitor"
            && k != "HorizontalPodAutoscaler"),
        "{got:?}"
    );
    assert_eq!(got.len(), 10);
}

#[test]
fn service_monitor_and_services() {
    let children = build(&desired(spec_json()));
    let sm = children
        .iter()
        .find_map(|c| match c {
            Child::ServiceMonitor(s) => Some(serde_json::to_value(s).unwrap()),
            _ => None,
        })
        .unwrap();
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        sm["spec"]["endpoints"][0],
        json!({"port": "http", "path": "/metrics", "interval": "15s"})
    );
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
        "shop"
    );
    for c in &children {
        if let Child::Service(s) = c {
            let spec = s.spec.clone().unwrap();
            let port = &spec.ports.unwrap()[0];
            assert_eq!(port.name.as_deref(), Some("http"));
            assert_eq!(
                spec.selector.unwrap()["app.kubernetes.io/component"],
                s.metadata.name.clone().unwrap().trim_start_matches("shop-")
            );
            // The ServiceMonitor selects Services by part-of.
            assert_eq!(
                s.metadata.labels.clone().unwrap()["app.kubernetes.io/part-of"],
                "cqrs-stack"
            );
        }
        if let Child::PodDisruptionBudget(p) = c {
            assert_eq!(
                p.spec.clone().unwrap().max_unavailable,
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
            );
        }
    }
}

#[test]
fn defaults_fill_an_minimal_spec() {
    let s = spec(json!({
        "images": {"gateway": "g", "mutation": "m", "query": "q"},
        "postgres": {"secretName": "pg"}, "mongo": {"secretName": "mo"}, "auth": {"secretName": "au"},
        "kafka": {"bootstrapServers": "k:9092", "strimziCluster": "c"}
    }));
    assert_eq!(
        (s.gateway.replicas, s.mutation.replicas, s.query.replicas),
        (1, 1, 1)
    );
    assert_eq!(
        (
            s.kafka.partitions,
            s.kafka.replicas,
            s.kafka.topic_prefix.as_str()
        ),
        (6, 3, "cqrs")
    );
    assert_eq!(s.kafka.deletion_policy, DeletionPolicy::Retain);
    assert_eq!(
        (s.postgres.key.as_str(), s.mongo.database.as_str()),
        ("url", "cqrs")
    );
    assert_eq!(s.projections.generation, 1);
    assert!(!s.monitoring.service_monitor);
    validate("x", &s).expect("minimal spec is valid");
}

#[test]
fn validation_reports_every_problem() {
    let mut v = spec_json();
    v["images"]["query"] = json!(" ");
    v["kafka"]["topicMode"] = json!("strimzi");
    v["kafka"]["strimziCluster"] = json!("");
    v["kafka"]["topicPrefix"] = json!("-Bad");
    v["kafka"]["config"] = json!({"retention.ms": "forever", "Bad Key": "1"});
    v["gateway"]["resources"] = json!({"requests": {"cpu": "2"}, "limits": {"cpu": "500m"}});
    v["mutation"]["resources"] = json!({"limits": {"bogus": "1", "memory": "lots"}});
    v["query"]["autoscaling"] = json!({"minReplicas": 5, "maxReplicas": 2});
    v["monitoring"]["interval"] = json!("soon");
    let errs = validate("9-starts-with-digit", &spec(v)).expect_err("invalid");
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    for f in [
        "metadata.name",
        "spec.images.query",
        "spec.kafka.strimziCluster",
        "spec.kafka.topicPrefix",
        "spec.kafka.config.retention.ms",
        "spec.kafka.config.Bad Key",
        "spec.gateway.resources.requests.cpu",
        "spec.mutation.resources.limits.bogus",
        "spec.mutation.resources.limits.memory",
        "spec.query.autoscaling",
        "spec.monitoring.interval",
    ] {
        assert!(fields.contains(&f), "{f} missing from {fields:?}");
    }
    let long = "a".repeat(55);
    assert!(validate(&long, &spec(spec_json())).is_err());
    assert!(validate(&"a".repeat(54), &spec(spec_json())).is_ok());
}

#[test]
fn quantities() {
    assert_eq!(parse_quantity("100m"), Some(0.1));
    assert_eq!(parse_quantity("2"), Some(2.0));
    assert_eq!(parse_quantity("1Ki"), Some(1024.0));
    assert_eq!(parse_quantity("1Gi"), Some(1024.0 * 1024.0 * 1024.0));
    assert_eq!(parse_quantity("1G"), Some(1e9));
    assert_eq!(parse_quantity("1e3"), Some(1000.0));
    assert_eq!(parse_quantity("0.5"), Some(0.5));
    assert_eq!(parse_quantity("lots"), None);
    assert!(parse_quantity("1Gi") > parse_quantity("1000Mi"));
}

#[test]
fn shutdown_budgets_end_before_the_grace_period() {
    let children = build(&desired(spec_json()));
    let cm = children
        .iter()
        .find_map(|c| match c {
            Child::ConfigMap(c) => c.data.clone(),
            _ => None,
        })
        .unwrap();
    let mutation_budget: i64 = cm["SHUTDOWN_TIMEOUT_SECS"].parse().unwrap();
    let gateway_budget: i64 = cm["GATEWAY_DRAIN_TIMEOUT"]
        .strip_suffix('s')
        .unwrap()
        .parse()
        .unwrap();
    for name in ["shop-gateway", "shop-mutation", "shop-query"] {
        let grace = deployment(&children, name)
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .termination_grace_period_seconds
            .unwrap();
        assert!(
            mutation_budget < grace && gateway_budget < grace,
            "{name}: budgets {mutation_budget}/{gateway_budget} s vs grace {grace} s"
        );
    }
}

#[test]
fn min_insync_replicas_follows_the_replication_factor_in_both_topic_modes() {
    for (replicas, want) in [(1, "1"), (2, "1"), (3, "2"), (5, "4")] {
        let mut v = spec_json();
        v["kafka"]["replicas"] = json!(replicas);
        v["kafka"]["config"] = json!({});
        let topics: Vec<Value> = build(&desired(v.clone()))
            .iter()
            .filter_map(|c| match c {
                Child::KafkaTopic(t) => Some(t.data.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(topics.len(), 4);
        for t in &topics {
            assert_eq!(
                t["spec"]["config"]["min.insync.replicas"], want,
                "strimzi mode, RF {replicas}"
            );
        }
        v["kafka"]["topicMode"] = json!("direct");
        let cm = build(&desired(v))
            .iter()
            .find_map(|c| match c {
                Child::ConfigMap(c) => c.data.clone(),
                _ => None,
            })
            .unwrap();
        let config: BTreeMap<String, String> = serde_json::from_str(&cm["TOPIC_CONFIG"]).unwrap();
        assert_eq!(
            config["min.insync.replicas"], want,
            "direct mode, RF {replicas}"
        );
    }
    // A configured value wins.
    let mut v = spec_json();
    v["kafka"]["config"] = json!({"min.insync.replicas": "3"});
    let t = build(&desired(v))
        .iter()
        .find_map(|c| match c {
            Child::KafkaTopic(t) => Some(t.data.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(t["spec"]["config"]["min.insync.replicas"], "3");
}

/// The data of the stack's ConfigMap.
fn config_map(children: &[Child]) -> BTreeMap<String, String> {
    children
        .iter()
        .find_map(|c| match c {
            Child::ConfigMap(c) => c.data.clone(),
            _ => None,
        })
        .unwrap()
}
