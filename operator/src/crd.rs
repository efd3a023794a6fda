//! The `CqrsStack` custom resource: the Rust types are the source of truth for the CRD schema.
//!
//! Invariants that the API server can check are CEL rules (`x-kubernetes-validations`) with readable messages,
//! so `kubectl apply` of a bad spec fails immediately. [`crate::validate`] repeats them (and adds the checks CEL
//! cannot express) for clusters whose installed CRD is older than the operator.
#![allow(clippy::unwrap_used)] // inside the KubeSchema derive's generated code

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "cqrs.dev";
pub const VERSION: &str = "v1alpha1";

/// Desired state of one CQRS stack: gateway, mutation and query Deployments plus their Kafka topics.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cqrs.dev",
    version = "v1alpha1",
    kind = "CqrsStack",
    plural = "cqrsstacks",
    shortname = "cqrs",
    category = "cqrs",
    namespaced,
    status = "CqrsStackStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Gateway","type":"string","description":"ready/desired gateway replicas","jsonPath":".status.replicas.gateway"}"#,
    printcolumn = r#"{"name":"Mutation","type":"string","description":"ready/desired mutation replicas","jsonPath":".status.replicas.mutation"}"#,
    printcolumn = r#"{"name":"Query","type":"string","description":"ready/desired query replicas","jsonPath":".status.replicas.query"}"#,
    printcolumn = r#"{"name":"Lag","type":"integer","description":"messages the projection is behind: the rebuilding generation during a rebuild, else the serving one","jsonPath":".status.projections.lag"}"#,
    printcolumn = r#"{"name":"Generation","type":"integer","description":"projection generation serving reads","jsonPath":".status.projections.serving"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CqrsStackSpec {
    /// Container images of the three services.
    pub images: Images,
    /// The HTTP gateway (port 3123).
    #[serde(default)]
    pub gateway: ComponentSpec,
    /// The write side (port 3124).
    #[serde(default)]
    pub mutation: ComponentSpec,
    /// The read side and its projections (port 3125).
    #[serde(default)]
    pub query: ComponentSpec,
    /// PostgreSQL connection URL, read from a Secret (given to mutation as DATABASE_URL).
    pub postgres: SecretKeyRef,
    /// MongoDB connection URL from a Secret (given to query as MONGO_URL) and the database name.
    pub mongo: MongoSpec,
    /// Secret whose keys are given to the gateway as environment variables (JWT settings, AUTH_*).
    pub auth: AuthSpec,
    /// Kafka connection and topics.
    pub kafka: KafkaSpec,
    /// Projection generations of the read side.
    #[serde(default)]
    pub projections: ProjectionsSpec,
    /// Prometheus Operator integration.
    #[serde(default)]
    pub monitoring: MonitoringSpec,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Images {
    #[schemars(length(min = 1, max = 512))]
    pub gateway: String,
    #[schemars(length(min = 1, max = 512))]
    pub mutation: String,
    #[schemars(length(min = 1, max = 512))]
    pub query: String,
    /// Image pull policy of all three containers (Kubernetes default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Scaling and resources of one service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ComponentSpec {
    /// Replicas (ignored while `autoscaling` is set: the HorizontalPodAutoscaler owns the count).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// When set, a HorizontalPodAutoscaler scales the Deployment between these bounds on CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// Container resources (requests must not exceed limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

fn default_replicas() -> i32 {
    1
}

impl Default for ComponentSpec {
    fn default() -> Self {
        Self {
            replicas: default_replicas(),
            autoscaling: None,
            resources: None,
        }
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas"))]
pub struct Autoscaling {
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Target average CPU utilisation in percent of the requests.
    #[serde(default = "default_cpu_target")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percentage: i32,
}

fn default_cpu_target() -> i32 {
    80
}

/// A key of a Secret in the stack's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    #[serde(default = "default_url_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_url_key() -> String {
    "url".into()
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MongoSpec {
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    #[serde(default = "default_url_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
    /// Database holding the read models.
    #[serde(default = "default_mongo_db")]
    #[schemars(length(min = 1, max = 63))]
    pub database: String,
}

fn default_mongo_db() -> String {
    "cqrs".into()
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Every key of this Secret becomes an environment variable of the gateway.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.topicMode != 'strimzi' || (has(self.strimziCluster) && size(self.strimziCluster) > 0)").message("kafka.strimziCluster is required when kafka.topicMode is strimzi"),
    validation = Rule::new("self.topicPrefix.matches('^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$')").message("kafka.topicPrefix must be lowercase letters, digits, '.' or '-', starting and ending with a letter or digit")
)]
pub struct KafkaSpec {
    /// Bootstrap servers, e.g. `my-cluster-kafka-bootstrap.kafka.svc:9092`.
    #[schemars(length(min = 1, max = 1024))]
    pub bootstrap_servers: String,
    /// `strimzi`: the operator creates `KafkaTopic` resources; `direct`: topics are created through the Kafka
    /// admin API (not yet implemented by the operator; the stack reports TopicsReady=Unknown).
    #[serde(default)]
    pub topic_mode: TopicMode,
    /// Name of the Strimzi `Kafka` cluster (the `strimzi.io/cluster` label of the topics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub strimzi_cluster: Option<String>,
    /// Topics are `<prefix>.users`, `<prefix>.products`, `<prefix>.orders` and `<prefix>.dlq`.
    #[serde(default = "default_topic_prefix")]
    #[schemars(length(min = 1, max = 200))]
    pub topic_prefix: String,
    /// Partitions per topic: the upper bound of useful query replicas. Can only grow.
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 10000))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("kafka.partitions cannot be decreased: Kafka cannot remove partitions from a topic"))]
    pub partitions: i32,
    /// Replication factor of each topic.
    #[serde(default = "default_topic_replicas")]
    #[schemars(range(min = 1, max = 32767))]
    pub replicas: i32,
    /// Extra topic configuration; `retention.ms` and `retention.bytes` default to -1 (keep events forever,
    /// projections are rebuilt from the topics).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// What happens to the topics when the CqrsStack is deleted: `Retain` (default) orphans the KafkaTopic
    /// resources so no event is lost; `Delete` lets Kubernetes garbage-collect them (and Strimzi delete the topics).
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

fn default_topic_prefix() -> String {
    "cqrs".into()
}
fn default_partitions() -> i32 {
    6
}
fn default_topic_replicas() -> i32 {
    3
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TopicMode {
    #[default]
    Strimzi,
    Direct,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    #[default]
    Retain,
    Delete,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProjectionsSpec {
    /// The projection generation that should serve reads. Bump it to rebuild the read models from the topics
    /// into new collections; reads switch over when the new generation has caught up.
    #[serde(default = "default_generation")]
    #[schemars(range(min = 1))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("projections.generation can only increase: bump it to start a rebuild"))]
    pub generation: i64,
}

fn default_generation() -> i64 {
    1
}

impl Default for ProjectionsSpec {
    fn default() -> Self {
        Self {
            generation: default_generation(),
        }
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Create a Prometheus Operator `ServiceMonitor` for the three services.
    #[serde(default)]
    pub service_monitor: bool,
    /// Scrape interval of the ServiceMonitor, e.g. `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub interval: Option<String>,
}

/// Observed state, written by the operator through the status subresource.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CqrsStackStatus {
    /// The `metadata.generation` the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, DeploymentsReady, TopicsReady, Rebuilding, QueryParallelism.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Ready/desired replicas per service, e.g. `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicaSummary>,
    /// Partitions of the topics as they exist (never lower than what was observed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,
    /// Projection generations and rebuild progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projections: Option<ProjectionStatus>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSummary {
    pub gateway: String,
    pub mutation: String,
    pub query: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProjectionStatus {
    /// Generation serving reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<i64>,
    /// Generation being built (equal to `serving` when no rebuild runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<i64>,
    /// Rebuild state reported by the query service: running, caughtUp, switched, cancelled, failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Rebuild progress from 0.0 to 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// Messages the rebuilding generation is behind during a rebuild; otherwise the serving generation's consumer lag
    /// (refreshed every `LAG_POLL_SECONDS`; absent while the query service cannot be asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
}

/// The CRD as the API server gets it.
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    CqrsStack::crd()
}

/// The CRD as YAML, exactly as checked in under `charts/cqrs-operator/crds/` and `manifests/crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(&crd())?;
    Ok(format!(
        "# Generated by `cargo run -p cqrs-operator --bin crdgen`; do not edit.\n{body}"
    ))
}
