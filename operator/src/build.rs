//! Pure construction of every object a `CqrsStack` owns. No I/O: unit-tested without a cluster.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment},
        autoscaling::v2::{
            CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec,
            MetricSpec, MetricTarget, ResourceMetricSource,
        },
        core::v1::{
            Capabilities, ConfigMap, ConfigMapEnvSource, Container, ContainerPort,
            EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, Lifecycle,
            LifecycleHandler, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
            SecretEnvSource, SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec,
            SleepAction, Volume, VolumeMount,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use crate::{
    crd::{ComponentSpec, TopicMode},
    validate::ValidSpec,
};

pub const FIELD_MANAGER: &str = "cqrs-operator";
pub const PART_OF: &str = "cqrs-stack";
/// Pod template annotation whose change rolls the pods when their configuration changes.
pub const CONFIG_HASH_ANNOTATION: &str = "cqrs.dev/config-hash";
/// Kafka topics per aggregate type plus the dead-letter topic.
pub const TOPICS: [&str; 4] = ["users", "products", "orders", "dlq"];
/// UID/GID the containers run as (the Dockerfiles create this user).
pub const RUN_AS: i64 = 65532;
/// The pods' `terminationGracePeriodSeconds`: after it the kubelet sends SIGKILL.
pub const TERMINATION_GRACE_SECONDS: i64 = 30;
/// A terminating pod keeps serving this long before it gets SIGTERM (a `preStop` sleep): its endpoint's
/// removal has to reach every kube-proxy (and the clients' connection pools) first. Without it, the rolling
/// update on the local cluster failed requests on connections to pods that had already stopped accepting.
pub const PRE_STOP_SECONDS: i64 = 5;
/// The services' own shutdown budget (mutation's `SHUTDOWN_TIMEOUT_SECS`, the gateway's
/// `GATEWAY_DRAIN_TIMEOUT`), derived from the grace period so it always ends before the SIGKILL. The grace
/// period counts from the start of the preStop sleep; the margin covers the process exit itself.
pub const SHUTDOWN_BUDGET_SECONDS: i64 = TERMINATION_GRACE_SECONDS - PRE_STOP_SECONDS - 5;

/// The three services of a stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Gateway,
    Mutation,
    Query,
}

impl Component {
    pub const ALL: [Component; 3] = [Component::Gateway, Component::Mutation, Component::Query];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Mutation => "mutation",
            Self::Query => "query",
        }
    }
    pub fn port(self) -> i32 {
        match self {
            Self::Gateway => 3123,
            Self::Mutation => 3124,
            Self::Query => 3125,
        }
    }
}

/// Everything the build step needs: the stack's identity and its validated spec.
#[derive(Debug, Clone)]
pub struct Desired {
    pub name: String,
    pub namespace: String,
    /// Controller owner reference pointing at the CqrsStack.
    pub owner: OwnerReference,
    pub spec: ValidSpec,
}

/// One owned object, typed where k8s-openapi has a type.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a handful per reconcile; boxing buys nothing
pub enum Child {
    ConfigMap(ConfigMap),
    Deployment(Deployment),
    Service(Service),
    PodDisruptionBudget(PodDisruptionBudget),
    HorizontalPodAutoscaler(HorizontalPodAutoscaler),
    KafkaTopic(DynamicObject),
    ServiceMonitor(DynamicObject),
}

impl Child {
    pub fn name(&self) -> String {
        let meta = match self {
            Child::ConfigMap(o) => &o.metadata,
            Child::Deployment(o) => &o.metadata,
            Child::Service(o) => &o.metadata,
            Child::PodDisruptionBudget(o) => &o.metadata,
            Child::HorizontalPodAutoscaler(o) => &o.metadata,
            Child::KafkaTopic(o) | Child::ServiceMonitor(o) => &o.metadata,
        };
        meta.name.clone().unwrap_or_default()
    }
    pub fn kind(&self) -> &'static str {
        match self {
            Child::ConfigMap(_) => "ConfigMap",
            Child::Deployment(_) => "Deployment",
            Child::Service(_) => "Service",
            Child::PodDisruptionBudget(_) => "PodDisruptionBudget",
            Child::HorizontalPodAutoscaler(_) => "HorizontalPodAutoscaler",
            Child::KafkaTopic(_) => "KafkaTopic",
            Child::ServiceMonitor(_) => "ServiceMonitor",
        }
    }
}

pub fn kafka_topic_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kafka.strimzi.io", "v1", "KafkaTopic"),
        "kafkatopics",
    )
}

pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

pub fn child_name(stack: &str, c: Component) -> String {
    format!("{stack}-{}", c.as_str())
}

pub fn config_map_name(stack: &str) -> String {
    format!("{stack}-config")
}

/// Kubernetes name (and Kafka topic name) of one topic.
pub fn topic_name(prefix: &str, topic: &str) -> String {
    format!("{prefix}.{topic}")
}

/// Labels that select one component's pods.
pub fn selector_labels(stack: &str, c: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/instance".to_owned(), stack.to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            c.as_str().to_owned(),
        ),
    ])
}

/// Labels on every owned object.
pub fn common_labels(stack: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/instance".to_owned(), stack.to_owned()),
        ("app.kubernetes.io/part-of".to_owned(), PART_OF.to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            FIELD_MANAGER.to_owned(),
        ),
    ])
}

fn component_labels(stack: &str, c: Component) -> BTreeMap<String, String> {
    let mut l = common_labels(stack);
    l.insert(
        "app.kubernetes.io/name".to_owned(),
        format!("cqrs-{}", c.as_str()),
    );
    l.extend(selector_labels(stack, c));
    l
}

fn meta(d: &Desired, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(d.namespace.clone()),
        labels: Some(labels),
        owner_references: Some(vec![d.owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// Every object the stack should own, in apply order (configuration before the workloads that read it).
pub fn build(d: &Desired) -> Vec<Child> {
    let spec = d.spec.spec();
    let config = config_data(d);
    let hash = config_hash(&config);
    let mut out = vec![Child::ConfigMap(ConfigMap {
        metadata: meta(d, config_map_name(&d.name), common_labels(&d.name)),
        data: Some(config),
        ..ConfigMap::default()
    })];
    for c in Component::ALL {
        let cs = component_spec(d, c);
        out.push(Child::Deployment(deployment(d, c, cs, &hash)));
        out.push(Child::Service(service(d, c)));
        out.push(Child::PodDisruptionBudget(pdb(d, c)));
        if cs.autoscaling.is_some() {
            out.push(Child::HorizontalPodAutoscaler(hpa(d, c, cs)));
        }
    }
    if spec.kafka.topic_mode == TopicMode::Strimzi {
        for t in TOPICS {
            out.push(Child::KafkaTopic(kafka_topic(d, t)));
        }
    }
    if spec.monitoring.service_monitor {
        out.push(Child::ServiceMonitor(service_monitor(d)));
    }
    out
}

fn component_spec(d: &Desired, c: Component) -> &ComponentSpec {
    let spec = d.spec.spec();
    match c {
        Component::Gateway => &spec.gateway,
        Component::Mutation => &spec.mutation,
        Component::Query => &spec.query,
    }
}

/// Settings shared by the three services (each reads the names it knows).
pub fn config_data(d: &Desired) -> BTreeMap<String, String> {
    let spec = d.spec.spec();
    let url = |c: Component| format!("http://{}:{}", child_name(&d.name, c), c.port());
    let mut data = BTreeMap::from([
        ("LOG_FORMAT".to_owned(), "json".to_owned()),
        (
            "GATEWAY_LISTEN".to_owned(),
            format!("0.0.0.0:{}", Component::Gateway.port()),
        ),
        (
            "MUTATION_LISTEN".to_owned(),
            format!("0.0.0.0:{}", Component::Mutation.port()),
        ),
        (
            "QUERY_LISTEN".to_owned(),
            format!("0.0.0.0:{}", Component::Query.port()),
        ),
        ("MUTATION_URL".to_owned(), url(Component::Mutation)),
        ("QUERY_URL".to_owned(), url(Component::Query)),
        (
            "KAFKA_BOOTSTRAP".to_owned(),
            spec.kafka.bootstrap_servers.clone(),
        ),
        ("TOPIC_PREFIX".to_owned(), spec.kafka.topic_prefix.clone()),
        ("MONGO_DB".to_owned(), spec.mongo.database.clone()),
        (
            "PROJECTION_GENERATION".to_owned(),
            spec.projections.generation.to_string(),
        ),
        // Topic mode direct: mutation creates missing topics through the Kafka admin API at startup.
        // Strimzi mode: the operator's KafkaTopics own them, so the services must not create them.
        (
            "CREATE_TOPICS".to_owned(),
            (spec.kafka.topic_mode == TopicMode::Direct).to_string(),
        ),
        (
            "TOPIC_PARTITIONS".to_owned(),
            spec.kafka.partitions.to_string(),
        ),
        (
            "TOPIC_REPLICATION".to_owned(),
            spec.kafka.replicas.to_string(),
        ),
        // Shutdown budgets below the pods' grace period (TERMINATION_GRACE_SECONDS), from one constant.
        (
            "SHUTDOWN_TIMEOUT_SECS".to_owned(),
            SHUTDOWN_BUDGET_SECONDS.to_string(),
        ),
        (
            "GATEWAY_DRAIN_TIMEOUT".to_owned(),
            format!("{SHUTDOWN_BUDGET_SECONDS}s"),
        ),
    ]);
    if spec.kafka.topic_mode == TopicMode::Direct {
        // The configuration mutation creates the topics with and reconciles on existing ones: the same as the
        // KafkaTopics' of strimzi mode. A JSON object, because Kafka values may contain commas.
        data.insert(
            "TOPIC_CONFIG".to_owned(),
            serde_json::to_string(&topic_config(d)).unwrap_or_else(|_| "{}".to_owned()),
        );
    }
    data
}

/// FNV-1a over the configuration, without PROJECTION_GENERATION: a generation bump is a rebuild driven
/// through the query service's admin API, and must not restart the pods that are doing it.
pub fn config_hash(config: &BTreeMap<String, String>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in config
        .iter()
        .filter(|(k, _)| k.as_str() != "PROJECTION_GENERATION")
    {
        for b in k.bytes().chain([0]).chain(v.bytes()).chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: key.to_owned(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn probe(path: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        ..SeccompProfile::default()
    }
}

fn deployment(d: &Desired, c: Component, cs: &ComponentSpec, config_hash: &str) -> Deployment {
    let spec = d.spec.spec();
    let (image, env, env_from_secret) = match c {
        Component::Gateway => (
            &spec.images.gateway,
            vec![],
            Some(spec.auth.secret_name.clone()),
        ),
        Component::Mutation => (
            &spec.images.mutation,
            vec![secret_env(
                "DATABASE_URL",
                &spec.postgres.secret_name,
                &spec.postgres.key,
            )],
            None,
        ),
        Component::Query => (
            &spec.images.query,
            vec![
                // No QUERY_INSTANCE_ID (static group membership) for Deployment pods: a static member does not
                // leave the group when it stops, and a Deployment's replacement pods have new names, so every
                // rolling update left the old pods' partitions unconsumed for the session timeout (reads with
                // X-Min-Version answered 503 on the local cluster). A dynamic member leaves on SIGTERM and its
                // partitions move at once; a container killed in place costs the session timeout (10 s).
                secret_env("MONGO_URL", &spec.mongo.secret_name, &spec.mongo.key),
            ],
            None,
        ),
    };
    let mut env_from = vec![EnvFromSource {
        config_map_ref: Some(ConfigMapEnvSource {
            name: config_map_name(&d.name),
            optional: Some(false),
        }),
        ..EnvFromSource::default()
    }];
    if let Some(secret) = env_from_secret {
        env_from.push(EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: secret,
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        });
    }
    let container = Container {
        name: c.as_str().to_owned(),
        image: Some(image.clone()),
        image_pull_policy: spec.images.pull_policy.map(|p| p.as_str().to_owned()),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_owned()),
            container_port: c.port(),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        env_from: Some(env_from),
        env: if env.is_empty() { None } else { Some(env) },
        resources: cs.resources.clone(),
        startup_probe: Some(probe("/healthz", 2, 30)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "tmp".to_owned(),
            mount_path: "/tmp".to_owned(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    Deployment {
        metadata: meta(d, child_name(&d.name, c), component_labels(&d.name, c)),
        spec: Some(DeploymentSpec {
            // With autoscaling the HPA owns the replica count; leaving the field out of our apply lets it.
            replicas: if cs.autoscaling.is_some() {
                None
            } else {
                Some(cs.replicas)
            },
            selector: LabelSelector {
                match_labels: Some(selector_labels(&d.name, c)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(component_labels(&d.name, c)),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_HASH_ANNOTATION.to_owned(),
                        config_hash.to_owned(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        seccomp_profile: Some(runtime_default()),
                        ..PodSecurityContext::default()
                    }),
                    volumes: Some(vec![Volume {
                        name: "tmp".to_owned(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

fn service(d: &Desired, c: Component) -> Service {
    Service {
        metadata: meta(d, child_name(&d.name, c), component_labels(&d.name, c)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector_labels(&d.name, c)),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: c.port(),
                target_port: Some(IntOrString::String("http".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn pdb(d: &Desired, c: Component) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(d, child_name(&d.name, c), component_labels(&d.name, c)),
        spec: Some(PodDisruptionBudgetSpec {
            // At most one pod down by voluntary disruption (node drains); never blocks a drain entirely.
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&d.name, c)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

fn hpa(d: &Desired, c: Component, cs: &ComponentSpec) -> HorizontalPodAutoscaler {
    let (min, max, cpu) = cs
        .autoscaling
        .as_ref()
        .map_or((cs.replicas, cs.replicas, 80), |a| {
            (
                a.min_replicas,
                a.max_replicas,
                a.target_cpu_utilization_percentage,
            )
        });
    HorizontalPodAutoscaler {
        metadata: meta(d, child_name(&d.name, c), component_labels(&d.name, c)),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".to_owned()),
                kind: "Deployment".to_owned(),
                name: child_name(&d.name, c),
            },
            min_replicas: Some(min),
            max_replicas: max,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".to_owned(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".to_owned(),
                    target: MetricTarget {
                        type_: "Utilization".to_owned(),
                        average_utilization: Some(cpu),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            ..HorizontalPodAutoscalerSpec::default()
        }),
        ..HorizontalPodAutoscaler::default()
    }
}

/// Topic configuration, in both topic modes (the `KafkaTopic`s' `spec.config` in `strimzi` mode, mutation's
/// `TOPIC_CONFIG` in `direct` mode): events are kept forever unless the spec says otherwise (projections are
/// rebuilt by replaying the topics from the beginning), and `min.insync.replicas` is the replication factor
/// minus one, at least 1: with `acks=all` an acknowledged event is on that many replicas, so from 3 replicas on
/// one broker can be lost without losing an acknowledged event or stopping writes. `spec.kafka.config` wins.
/// Mutation's own defaults for `direct` mode are the same (`services/mutation/src/relay.rs`, `topic_config`).
pub fn topic_config(d: &Desired) -> BTreeMap<String, String> {
    let k = &d.spec.spec().kafka;
    let mut config = BTreeMap::from([
        ("retention.ms".to_owned(), "-1".to_owned()),
        ("retention.bytes".to_owned(), "-1".to_owned()),
        (
            "min.insync.replicas".to_owned(),
            (k.replicas - 1).max(1).to_string(),
        ),
    ]);
    config.extend(k.config.clone());
    config
}

fn kafka_topic(d: &Desired, topic: &str) -> DynamicObject {
    let k = &d.spec.spec().kafka;
    let name = topic_name(&k.topic_prefix, topic);
    let mut labels = common_labels(&d.name);
    labels.insert(
        "strimzi.io/cluster".to_owned(),
        k.strimzi_cluster.clone().unwrap_or_default(),
    );
    let mut obj = DynamicObject::new(&name, &kafka_topic_resource()).within(&d.namespace);
    obj.metadata = meta(d, name.clone(), labels);
    obj.data = json!({
        "spec": {
            "topicName": name,
            "partitions": k.partitions,
            "replicas": k.replicas,
            "config": topic_config(d),
        }
    });
    obj
}

fn service_monitor(d: &Desired) -> DynamicObject {
    let m = &d.spec.spec().monitoring;
    let mut endpoint = json!({"port": "http", "path": "/metrics"});
    if let Some(interval) = &m.interval {
        endpoint["interval"] = json!(interval);
    }
    let mut obj = DynamicObject::new(&d.name, &service_monitor_resource()).within(&d.namespace);
    obj.metadata = meta(d, d.name.clone(), common_labels(&d.name));
    obj.data = json!({
        "spec": {
            "selector": {"matchLabels": {
                "app.kubernetes.io/instance": d.name,
                "app.kubernetes.io/part-of": PART_OF,
            }},
            "endpoints": [endpoint],
        }
    });
    obj
}
