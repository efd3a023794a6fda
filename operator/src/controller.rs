//! The reconcile loop: read → validate (pure) → build (pure) → server-side apply → status.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        autoscaling::v2::HorizontalPodAutoscaler,
        core::v1::{ConfigMap, Service},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    runtime::{
        Controller, Predicate, PredicateConfig, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        finalizer::{self, finalizer},
        predicates, reflector, watcher,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;

use crate::{
    build::{self, Child, Component, Desired, FIELD_MANAGER, TOPICS},
    crd::{
        CqrsStack, CqrsStackStatus, DeletionPolicy, ProjectionStatus, ReplicaSummary, TopicMode,
    },
    metrics::Metrics,
    rebuild::AdminClient,
    validate::{Invalid, validate},
};

pub const FINALIZER: &str = "cqrs.dev/cleanup";

/// Condition types written to `status.conditions`.
pub mod conditions {
    pub const READY: &str = "Ready";
    pub const DEPLOYMENTS_READY: &str = "DeploymentsReady";
    pub const TOPICS_READY: &str = "TopicsReady";
    pub const REBUILDING: &str = "Rebuilding";
    pub const QUERY_PARALLELISM: &str = "QueryParallelism";
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    #[error("CqrsStack has no {0}")]
    Missing(&'static str),
    #[error("serialization: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    /// Low-cardinality label for the failures metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 404 => "not_found",
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(s)) if s.code == 422 => "invalid",
            Error::Kube(kube::Error::Api(_)) => "api_error",
            Error::Kube(_) => "transport",
            Error::Finalizer(e) => match &**e {
                finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => {
                    inner.reason()
                }
                _ => "finalizer",
            },
            Error::Missing(_) => "malformed_object",
            Error::Json(_) => "serialization",
        }
    }
}

/// Operator settings (flags of the binary; set directly by tests).
#[derive(Debug, Clone)]
pub struct Config {
    /// Watch one namespace only (None: all namespaces).
    pub namespace: Option<String>,
    /// Base URL of a stack's query service, `{name}` and `{namespace}` substituted.
    pub query_url_template: String,
    /// How often a running rebuild is polled.
    pub rebuild_poll: Duration,
    /// Periodic re-check of a healthy stack (drift from other writers is repaired on owned-object events anyway).
    pub resync: Duration,
    /// Watch `KafkaTopic` objects (needs the Strimzi CRDs installed).
    /// How often the serving projection's lag is refreshed in the status when no rebuild runs.
    pub lag_poll: Duration,
    pub watch_kafka_topics: bool,
    /// Delete our ServiceMonitor when monitoring is switched off (needs the Prometheus Operator CRDs; a missing
    /// CRD is tolerated).
    pub watch_service_monitor_cleanup: bool,
    /// Reporting instance of Events (the pod name).
    pub instance: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: None,
            query_url_template: "http://{name}-query.{namespace}.svc:3125".to_owned(),
            rebuild_poll: Duration::from_secs(5),
            resync: Duration::from_secs(300),
            lag_poll: Duration::from_secs(30),
            watch_kafka_topics: true,
            watch_service_monitor_cleanup: true,
            instance: None,
        }
    }
}

pub struct Context {
    client: Client,
    config: Config,
    metrics: Metrics,
    recorder: Recorder,
    admin: AdminClient,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

/// Runs the controller until `shutdown` resolves; in-flight reconciliations finish first.
pub async fn run(
    client: Client,
    config: Config,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), reqwest::Error> {
    let admin = AdminClient::new(config.query_url_template.clone(), Duration::from_secs(5))?;
    let reporter = Reporter {
        controller: FIELD_MANAGER.to_owned(),
        instance: config.instance.clone(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        metrics,
        admin,
        failures: Mutex::new(HashMap::new()),
        config: config.clone(),
    });
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(());
    });
    // Our own status writes must not trigger reconciles (progress and lag change on every write, which made a
    // tight loop during rebuilds): the stacks' watch passes spec changes (generation) and finalizer changes
    // only. Rebuild progress and lag are polled on timers (Action::requeue) instead.
    let (reader, writer) = reflector::store();
    let stacks = reflector::reflector(
        writer,
        watcher::watcher(
            scoped::<CqrsStack>(&client, &config),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .applied_objects()
    .predicate_filter(
        predicates::generation.combine(predicates::finalizers),
        PredicateConfig::default(),
    );
    let mut controller = Controller::for_stream(stacks, reader)
        .owns(scoped::<Deployment>(&client, &config), owned.clone())
        .owns(scoped::<Service>(&client, &config), owned.clone())
        .owns(scoped::<ConfigMap>(&client, &config), owned.clone());
    if config.watch_kafka_topics {
        let ar = build::kafka_topic_resource();
        let api = match &config.namespace {
            Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar),
            None => Api::<DynamicObject>::all_with(client.clone(), &ar),
        };
        controller = controller.owns_with(api, ar, owned);
    }
    controller
        .graceful_shutdown_on(async move {
            let _ = rx.await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
            }
        })
        .await;
    tracing::info!("controller stopped");
    Ok(())
}

fn scoped<K>(client: &Client, config: &Config) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match &config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn key(obj: &CqrsStack) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

fn error_policy(obj: Arc<CqrsStack>, err: &Error, ctx: Arc<Context>) -> Action {
    let n = {
        let mut failures = ctx
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = failures.entry(key(&obj)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    // 1s, 2s, 4s … capped at 5 minutes.
    let delay =
        Duration::from_secs(1u64 << n.min(9).saturating_sub(1)).min(Duration::from_secs(300));
    tracing::warn!(stack = %key(&obj), error = %err, attempt = n, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

async fn reconcile(obj: Arc<CqrsStack>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = obj.namespace().ok_or(Error::Missing("namespace"))?;
    let api: Api<CqrsStack> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, obj.clone(), |event| async {
        match event {
            finalizer::Event::Apply(o) => apply(&o, &ctx).await,
            finalizer::Event::Cleanup(o) => cleanup(&o, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .duration
        .with_label_values(&[] as &[&str])
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => {
            ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
            ctx.failures
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&key(&obj));
        }
        Err(e) => {
            ctx.metrics.reconciles.with_label_values(&["error"]).inc();
            ctx.metrics.failures.with_label_values(&[e.reason()]).inc();
        }
    }
    result
}

/// Builds conditions, keeping `lastTransitionTime` when a condition's status did not change.
struct Conditions<'a> {
    previous: &'a [Condition],
    generation: Option<i64>,
    out: Vec<Condition>,
}

impl<'a> Conditions<'a> {
    fn new(previous: &'a [Condition], generation: Option<i64>) -> Self {
        Self {
            previous,
            generation,
            out: Vec::new(),
        }
    }
    fn set(&mut self, type_: &str, status: &str, reason: &str, message: impl Into<String>) {
        let prev = self.previous.iter().find(|c| c.type_ == type_);
        let last_transition_time = match prev {
            Some(p) if p.status == status => p.last_transition_time.clone(),
            _ => Time(Timestamp::now()),
        };
        self.out.push(Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.into(),
            observed_generation: self.generation,
            last_transition_time,
        });
    }
    /// Keeps a previous condition as it was (e.g. Rebuilding while the spec is invalid).
    fn keep(&mut self, type_: &str) {
        if let Some(p) = self.previous.iter().find(|c| c.type_ == type_) {
            self.out.push(p.clone());
        }
    }
}

fn has_condition(
    status: Option<&CqrsStackStatus>,
    type_: &str,
    reason: &str,
    generation: Option<i64>,
) -> bool {
    status.is_some_and(|s| {
        s.observed_generation == generation
            && s.conditions
                .iter()
                .any(|c| c.type_ == type_ && c.reason == reason)
    })
}

async fn publish(
    ctx: &Context,
    obj: &CqrsStack,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "could not publish event");
    }
}

async fn write_status(
    api: &Api<CqrsStack>,
    obj: &CqrsStack,
    status: CqrsStackStatus,
) -> Result<(), Error> {
    if obj.status.as_ref() == Some(&status) {
        return Ok(()); // unchanged: no write, so no watch event and no reconcile loop
    }
    let patch = json!({"apiVersion": "cqrs.dev/v1alpha1", "kind": "CqrsStack", "status": status});
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn apply_typed<K>(client: &Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj
        .meta()
        .name
        .clone()
        .ok_or(Error::Missing("child name"))?;
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

async fn apply_dynamic(
    client: &Client,
    ns: &str,
    ar: &ApiResource,
    obj: &DynamicObject,
) -> Result<DynamicObject, Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, ar);
    let name = obj
        .metadata
        .name
        .clone()
        .ok_or(Error::Missing("child name"))?;
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

/// Deletes an object we created earlier but no longer want (autoscaling or monitoring switched off).
/// A 404 from the API server: the object is absent, or its whole kind is (a CRD that is not installed, which
/// the server answers with a plain-text `404 page not found` that `get_opt` does not take for "not found").
fn is_absent(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

async fn delete_if_owned(
    api: Api<DynamicObject>,
    name: &str,
    owner_uid: &str,
) -> Result<(), Error> {
    let existing = match api.get_opt(name).await {
        Ok(o) => o,
        // Nothing of this kind can exist (e.g. no Prometheus Operator CRDs in the cluster): nothing to delete.
        Err(e) if is_absent(&e) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(existing) = existing
        && existing
            .owner_references()
            .iter()
            .any(|o| o.uid == owner_uid)
    {
        match api.delete(name, &Default::default()).await {
            Ok(_) => {}
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn deployment_readiness(d: &Deployment) -> (i32, i32, bool) {
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(st) = &d.status else {
        return (0, desired, false);
    };
    let ready = st.ready_replicas.unwrap_or(0);
    let current = st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
    // Rolled out as `kubectl rollout status` means it: every replica updated and available, and no old
    // replica left (during a rollout the old pods still count as ready, e.g. 3 ready of 2 desired).
    let updated = st.updated_replicas.unwrap_or(0);
    let rolled = updated >= desired
        && st.replicas.unwrap_or(0) <= updated
        && st.available_replicas.unwrap_or(0) >= desired;
    (ready, desired, current && rolled && ready >= desired)
}

fn topic_ready(t: &DynamicObject) -> bool {
    let generation = t.metadata.generation.unwrap_or(0);
    let status = &t.data["status"];
    let observed = status["observedGeneration"].as_i64().unwrap_or(0);
    let ready = status["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    });
    ready && observed >= generation
}

fn topic_partitions(t: &DynamicObject) -> Option<i64> {
    t.data["spec"]["partitions"].as_i64()
}

async fn apply(obj: &CqrsStack, ctx: &Context) -> Result<Action, Error> {
    let ns = obj.namespace().ok_or(Error::Missing("namespace"))?;
    let name = obj.name_any();
    let generation = obj.metadata.generation;
    let api: Api<CqrsStack> = Api::namespaced(ctx.client.clone(), &ns);
    let previous = obj.status.clone().unwrap_or_default();

    let valid = match validate(&name, &obj.spec) {
        Ok(v) => v,
        Err(errs) => return invalid_spec(obj, ctx, &api, &errs).await,
    };
    let mut owner = obj.controller_owner_ref(&()).ok_or(Error::Missing("uid"))?;
    // Foreground deletion waits for the children (needs update on cqrsstacks/finalizers in RBAC).
    owner.block_owner_deletion = Some(true);
    let owner_uid = owner.uid.clone();
    let desired = Desired {
        name: name.clone(),
        namespace: ns.clone(),
        owner,
        spec: valid,
    };
    let spec = desired.spec.spec();
    let children = build::build(&desired);

    // Kafka cannot remove partitions: never apply a KafkaTopic with fewer partitions than it has.
    let topic_api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &ns, &build::kafka_topic_resource());
    let mut decreased = Vec::new();
    let mut existing_max = i64::from(spec.kafka.partitions);
    // resourceVersion of each topic as read: the apply below is conditional on it, so a concurrent raise by
    // someone else makes our apply fail (409, retried) instead of silently lowering the partitions again.
    let mut read_versions: HashMap<String, String> = HashMap::new();
    if spec.kafka.topic_mode == TopicMode::Strimzi {
        for t in TOPICS {
            let topic = build::topic_name(&spec.kafka.topic_prefix, t);
            let Some(existing) = topic_api.get_opt(&topic).await? else {
                continue;
            };
            if let Some(rv) = existing.resource_version() {
                read_versions.insert(topic.clone(), rv);
            }
            if let Some(p) = topic_partitions(&existing)
                && p > i64::from(spec.kafka.partitions)
            {
                existing_max = existing_max.max(p);
                decreased.push(format!("{topic} has {p}"));
            }
        }
    }

    let mut deployments: HashMap<String, Deployment> = HashMap::new();
    let mut topics = Vec::new();
    for child in &children {
        match child {
            Child::ConfigMap(o) => {
                apply_typed(&ctx.client, &ns, o).await?;
            }
            Child::Deployment(o) => {
                let applied = apply_typed(&ctx.client, &ns, o).await?;
                deployments.insert(applied.name_any(), applied);
            }
            Child::Service(o) => {
                apply_typed(&ctx.client, &ns, o).await?;
            }
            Child::PodDisruptionBudget(o) => {
                apply_typed(&ctx.client, &ns, o).await?;
            }
            Child::HorizontalPodAutoscaler(o) => {
                apply_typed(&ctx.client, &ns, o).await?;
            }
            Child::KafkaTopic(o) => {
                if decreased.is_empty() {
                    let mut o = o.clone();
                    o.metadata.resource_version = read_versions.get(&child.name()).cloned();
                    topics.push(
                        apply_dynamic(&ctx.client, &ns, &build::kafka_topic_resource(), &o).await?,
                    );
                }
            }
            Child::ServiceMonitor(o) => {
                apply_dynamic(&ctx.client, &ns, &build::service_monitor_resource(), o).await?;
            }
        }
    }
    // Objects switched off in the spec.
    for c in Component::ALL {
        let cs = match c {
            Component::Gateway => &spec.gateway,
            Component::Mutation => &spec.mutation,
            Component::Query => &spec.query,
        };
        if cs.autoscaling.is_none() {
            let ar = ApiResource::erase::<HorizontalPodAutoscaler>(&());
            let hpa_api = Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &ns, &ar);
            delete_if_owned(hpa_api, &build::child_name(&name, c), &owner_uid).await?;
        }
    }
    // The ServiceMonitor is looked up whenever monitoring is off; the owner check keeps foreign objects safe.
    if !spec.monitoring.service_monitor && ctx.config.watch_service_monitor_cleanup {
        let sm_api = Api::<DynamicObject>::namespaced_with(
            ctx.client.clone(),
            &ns,
            &build::service_monitor_resource(),
        );
        delete_if_owned(sm_api, &name, &owner_uid).await?;
    }

    let mut conds = Conditions::new(&previous.conditions, generation);

    // Deployments.
    let mut summary = ReplicaSummary::default();
    let mut not_ready = Vec::new();
    for c in Component::ALL {
        let dname = build::child_name(&name, c);
        let (ready, desired_replicas, ok) = deployments
            .get(&dname)
            .map_or((0, 0, false), deployment_readiness);
        let text = format!("{ready}/{desired_replicas}");
        match c {
            Component::Gateway => summary.gateway = text,
            Component::Mutation => summary.mutation = text,
            Component::Query => summary.query = text,
        }
        if !ok {
            not_ready.push(format!("{dname} ({ready}/{desired_replicas} ready)"));
        }
    }
    let deployments_ready = not_ready.is_empty();
    if deployments_ready {
        conds.set(
            conditions::DEPLOYMENTS_READY,
            "True",
            "AllReady",
            "gateway, mutation and query are available",
        );
    } else {
        conds.set(
            conditions::DEPLOYMENTS_READY,
            "False",
            "Progressing",
            format!("waiting for {}", not_ready.join(", ")),
        );
    }

    // Topics.
    let (topics_ok, topics_reason, topics_message) = if spec.kafka.topic_mode == TopicMode::Direct {
        conds.set(
            conditions::TOPICS_READY,
            "Unknown",
            "CreatedByMutation",
            "kafka.topicMode is direct: the mutation service creates missing topics with the Kafka admin API \
             at startup (CREATE_TOPICS=true); the operator does not manage their partitions",
        );
        (true, "", String::new())
    } else if !decreased.is_empty() {
        let message = format!(
            "spec.kafka.partitions is {} but {}; Kafka cannot remove partitions, so the topics were left unchanged. \
             Set spec.kafka.partitions to at least {existing_max}",
            spec.kafka.partitions,
            decreased.join(", ")
        );
        if !has_condition(
            Some(&previous),
            conditions::TOPICS_READY,
            "PartitionsDecrease",
            generation,
        ) {
            publish(
                ctx,
                obj,
                EventType::Warning,
                "PartitionsDecrease",
                "ApplyTopics",
                message.clone(),
            )
            .await;
        }
        conds.set(
            conditions::TOPICS_READY,
            "False",
            "PartitionsDecrease",
            message.clone(),
        );
        (false, "PartitionsDecrease", message)
    } else {
        let waiting: Vec<String> = topics
            .iter()
            .filter(|t| !topic_ready(t))
            .map(|t| t.name_any())
            .collect();
        if waiting.is_empty() {
            conds.set(
                conditions::TOPICS_READY,
                "True",
                "AllReady",
                "all KafkaTopics are Ready",
            );
            (true, "", String::new())
        } else {
            let message = format!("waiting for Strimzi to make {} Ready", waiting.join(", "));
            conds.set(
                conditions::TOPICS_READY,
                "False",
                "TopicsNotReady",
                message.clone(),
            );
            (false, "TopicsNotReady", message)
        }
    };

    // Query replicas beyond the partition count sit idle in the consumer group.
    let query_max = spec
        .query
        .autoscaling
        .as_ref()
        .map_or(spec.query.replicas, |a| a.max_replicas);
    let partitions = existing_max.max(i64::from(spec.kafka.partitions));
    if i64::from(query_max) > partitions {
        conds.set(
            conditions::QUERY_PARALLELISM,
            "False",
            "QueryReplicasExceedPartitions",
            format!("query may run {query_max} replicas but topics have {partitions} partitions: the extra replicas consume nothing"),
        );
    } else {
        conds.set(
            conditions::QUERY_PARALLELISM,
            "True",
            "Sufficient",
            format!("{partitions} partitions for at most {query_max} query replicas"),
        );
    }

    // Projection rebuilds.
    let (projections, rebuild_requeue) =
        drive_rebuild(obj, ctx, &previous, &mut conds, &name, &ns).await;

    // Ready.
    let ready = deployments_ready && topics_ok;
    if ready {
        conds.set(conditions::READY, "True", "Ready", "the stack is running");
    } else if !decreased.is_empty() {
        // A problem only a person can fix outranks "still starting".
        conds.set(conditions::READY, "False", topics_reason, topics_message);
    } else if !deployments_ready {
        conds.set(
            conditions::READY,
            "False",
            "DeploymentsNotReady",
            format!("waiting for {}", not_ready.join(", ")),
        );
    } else {
        conds.set(conditions::READY, "False", topics_reason, topics_message);
    }
    ctx.metrics
        .stack_ready
        .with_label_values(&[ns.as_str(), name.as_str()])
        .set(i64::from(ready));

    let mut out = conds.out;
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    let status = CqrsStackStatus {
        observed_generation: generation,
        conditions: out,
        replicas: Some(summary),
        partitions: i32::try_from(partitions).ok(),
        projections: Some(projections),
    };
    write_status(&api, obj, status).await?;
    Ok(match rebuild_requeue {
        Some(d) => Action::requeue(d),
        None => Action::requeue(ctx.config.resync),
    })
}

async fn invalid_spec(
    obj: &CqrsStack,
    ctx: &Context,
    api: &Api<CqrsStack>,
    errs: &[Invalid],
) -> Result<Action, Error> {
    let generation = obj.metadata.generation;
    let previous = obj.status.clone().unwrap_or_default();
    let message = errs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    // One Warning Event per spec generation, not one per reconcile.
    if !has_condition(
        Some(&previous),
        conditions::READY,
        "InvalidSpec",
        generation,
    ) {
        publish(
            ctx,
            obj,
            EventType::Warning,
            "InvalidSpec",
            "Validate",
            message.clone(),
        )
        .await;
    }
    let mut conds = Conditions::new(&previous.conditions, generation);
    conds.set(conditions::READY, "False", "InvalidSpec", message);
    for t in [
        conditions::DEPLOYMENTS_READY,
        conditions::TOPICS_READY,
        conditions::REBUILDING,
        conditions::QUERY_PARALLELISM,
    ] {
        conds.keep(t);
    }
    let mut out = conds.out;
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    let status = CqrsStackStatus {
        observed_generation: generation,
        conditions: out,
        ..previous
    };
    write_status(api, obj, status).await?;
    let ns = obj.namespace().unwrap_or_default();
    ctx.metrics
        .stack_ready
        .with_label_values(&[ns.as_str(), obj.name_any().as_str()])
        .set(0);
    // Nothing will change until the spec does: wait for the next watch event instead of requeueing.
    Ok(Action::await_change())
}

/// Moves a projection rebuild forward; returns the new projection status and how soon to look again.
async fn drive_rebuild(
    obj: &CqrsStack,
    ctx: &Context,
    previous: &CqrsStackStatus,
    conds: &mut Conditions<'_>,
    name: &str,
    ns: &str,
) -> (ProjectionStatus, Option<Duration>) {
    let target = obj.spec.projections.generation;
    let prev = previous.projections.clone().unwrap_or_default();
    let Some(serving) = prev.serving else {
        // A new stack: the query service starts on PROJECTION_GENERATION from the ConfigMap.
        conds.set(
            conditions::REBUILDING,
            "False",
            "Idle",
            format!("serving generation {target}"),
        );
        return (
            ProjectionStatus {
                serving: Some(target),
                target: Some(target),
                ..Default::default()
            },
            None,
        );
    };
    if serving == target {
        // Keep saying the last rebuild completed (rather than flipping to Idle on the next reconcile).
        let completed = previous.conditions.iter().any(|c| {
            c.type_ == conditions::REBUILDING
                && c.reason == "RebuildComplete"
                && prev.target == Some(target)
        });
        let (reason, message) = if completed {
            (
                "RebuildComplete",
                format!("generation {target} now serves reads"),
            )
        } else {
            ("Idle", format!("serving generation {target}"))
        };
        conds.set(conditions::REBUILDING, "False", reason, message);
        // The Lag column shows the serving generation's lag between rebuilds (unknown while query is down).
        let lag = ctx.admin.serving_lag(name, ns).await.ok().flatten();
        return (
            ProjectionStatus {
                serving: Some(serving),
                target: Some(target),
                lag,
                ..Default::default()
            },
            Some(ctx.config.lag_poll),
        );
    }
    let poll = Some(ctx.config.rebuild_poll);
    let gen_label = target.to_string();
    let state = match ctx.admin.state(name, ns).await {
        Ok(s) => s,
        Err(e) => {
            conds.set(
                conditions::REBUILDING,
                "True",
                "QueryUnreachable",
                format!("rebuild of generation {target} pending: {e}"),
            );
            return (
                ProjectionStatus {
                    serving: Some(serving),
                    target: Some(target),
                    state: prev.state.clone(),
                    ..prev
                },
                poll,
            );
        }
    };
    if state.serving > target {
        // Reads were moved past the spec through query's admin API; query never goes back (409), so this waits
        // for the spec to catch up instead of retrying a start that cannot succeed.
        conds.set(
            conditions::REBUILDING,
            "False",
            "ServingNewerThanSpec",
            format!(
                "query serves generation {}, newer than spec.projections.generation {target}; set the spec to {} or higher",
                state.serving, state.serving
            ),
        );
        return (
            ProjectionStatus {
                serving: Some(state.serving),
                target: Some(target),
                ..Default::default()
            },
            Some(ctx.config.lag_poll),
        );
    }
    if state.serving == target {
        ctx.metrics
            .rebuild_progress
            .with_label_values(&[ns, name, gen_label.as_str()])
            .set(1.0);
        publish(
            ctx,
            obj,
            EventType::Normal,
            "RebuildComplete",
            "Rebuild",
            format!("generation {target} now serves reads"),
        )
        .await;
        conds.set(
            conditions::REBUILDING,
            "False",
            "RebuildComplete",
            format!("generation {target} now serves reads"),
        );
        return (
            ProjectionStatus {
                serving: Some(target),
                target: Some(target),
                ..Default::default()
            },
            None,
        );
    }
    let status_of = |r: &crate::rebuild::RebuildState| ProjectionStatus {
        serving: Some(state.serving),
        target: Some(target),
        state: Some(r.state.clone()),
        progress: r.progress,
        lag: r.lag,
    };
    match &state.rebuild {
        Some(r) if r.generation == target && r.state == "failed" => {
            if !has_condition(
                Some(previous),
                conditions::REBUILDING,
                "RebuildFailed",
                obj.metadata.generation,
            ) {
                publish(ctx, obj, EventType::Warning, "RebuildFailed", "Rebuild", format!("rebuild of generation {target} failed; bump spec.projections.generation to retry")).await;
            }
            conds.set(conditions::REBUILDING, "False", "RebuildFailed", format!("rebuild of generation {target} failed; bump spec.projections.generation to retry"));
            (status_of(r), None)
        }
        Some(r) if r.generation == target && r.state == "cancelled" => {
            // Cancelled through query's admin API: a person decided; it stays cancelled until the spec names
            // another generation (see docs/OPERATOR.md, "Who owns a rebuild").
            let message = format!(
                "rebuild of generation {target} was cancelled through the query admin API; set spec.projections.generation to another generation to rebuild again"
            );
            if !has_condition(
                Some(previous),
                conditions::REBUILDING,
                "RebuildCancelled",
                obj.metadata.generation,
            ) {
                publish(
                    ctx,
                    obj,
                    EventType::Warning,
                    "RebuildCancelled",
                    "Rebuild",
                    message.clone(),
                )
                .await;
            }
            conds.set(conditions::REBUILDING, "False", "RebuildCancelled", message);
            // Still polled: a restart through the admin API shows up as running again.
            (status_of(r), poll)
        }
        Some(r) if r.generation == target => {
            let progress = r.progress.unwrap_or(0.0);
            ctx.metrics
                .rebuild_progress
                .with_label_values(&[ns, name, gen_label.as_str()])
                .set(progress);
            let reason = if r.state == "caughtUp" || r.state == "switched" {
                "CaughtUp"
            } else {
                "Running"
            };
            conds.set(
                conditions::REBUILDING,
                "True",
                reason,
                format!(
                    "generation {target}: {} {:.0}%, lag {}",
                    r.state,
                    progress * 100.0,
                    r.lag.unwrap_or(0)
                ),
            );
            (status_of(r), poll)
        }
        other => {
            // Nothing running for this generation (or another generation running): start (or replace) it.
            match ctx.admin.start(name, ns, target).await {
                Ok(()) => {
                    let replaced = other
                        .as_ref()
                        .map(|r| format!(" (replacing generation {})", r.generation))
                        .unwrap_or_default();
                    publish(
                        ctx,
                        obj,
                        EventType::Normal,
                        "RebuildStarted",
                        "Rebuild",
                        format!("rebuilding projections as generation {target}{replaced}"),
                    )
                    .await;
                    conds.set(
                        conditions::REBUILDING,
                        "True",
                        "Started",
                        format!("rebuild of generation {target} started{replaced}"),
                    );
                }
                Err(e) => {
                    let reason = match e {
                        crate::rebuild::AdminError::Refused { .. } => "RebuildRefused",
                        crate::rebuild::AdminError::Http { .. } => "QueryUnreachable",
                    };
                    conds.set(
                        conditions::REBUILDING,
                        "True",
                        reason,
                        format!("could not start rebuild of generation {target}: {e}"),
                    );
                }
            }
            (
                ProjectionStatus {
                    serving: Some(state.serving),
                    target: Some(target),
                    state: Some("starting".to_owned()),
                    progress: Some(0.0),
                    lag: None,
                },
                poll,
            )
        }
    }
}

/// Finalizer work: with `deletionPolicy: Retain` the KafkaTopics are orphaned (our owner reference removed)
/// so garbage collection does not delete them and Strimzi does not delete the topics and their events.
async fn cleanup(obj: &CqrsStack, ctx: &Context) -> Result<Action, Error> {
    let ns = obj.namespace().ok_or(Error::Missing("namespace"))?;
    let uid = obj.uid().ok_or(Error::Missing("uid"))?;
    if obj.spec.kafka.topic_mode == TopicMode::Strimzi
        && obj.spec.kafka.deletion_policy == DeletionPolicy::Retain
    {
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &ns, &build::kafka_topic_resource());
        let mut retained = Vec::new();
        for t in TOPICS {
            let name = build::topic_name(&obj.spec.kafka.topic_prefix, t);
            let Some(topic) = api.get_opt(&name).await? else {
                continue;
            };
            let refs = topic.owner_references();
            if refs.iter().any(|r| r.uid == uid) {
                let kept: Vec<_> = refs.iter().filter(|r| r.uid != uid).cloned().collect();
                let patch = json!({"metadata": {"ownerReferences": kept}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                retained.push(name);
            }
        }
        if !retained.is_empty() {
            publish(
                ctx,
                obj,
                EventType::Normal,
                "TopicsRetained",
                "Cleanup",
                format!("deletionPolicy Retain: kept {}", retained.join(", ")),
            )
            .await;
        }
    }
    let name = obj.name_any();
    let _ = ctx
        .metrics
        .stack_ready
        .remove_label_values(&[ns.as_str(), name.as_str()]);
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::core::Status;

    use super::is_absent;

    fn deployment(
        desired: i32,
        replicas: i32,
        updated: i32,
        ready: i32,
        available: i32,
    ) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "d", "generation": 2},
            "spec": {"replicas": desired, "selector": {}, "template": {}},
            "status": {"observedGeneration": 2, "replicas": replicas, "updatedReplicas": updated,
                       "readyReplicas": ready, "availableReplicas": available}
        }))
        .expect("deployment")
    }

    #[test]
    fn a_deployment_is_ready_once_rolled_out_not_while_old_pods_remain() {
        // (desired, replicas, updated, ready, available) -> ok
        let cases = [
            ((2, 2, 2, 2, 2), true),
            // Mid-rollout, as seen on the cluster: both new pods ready, one old pod still running.
            ((2, 3, 2, 3, 3), false),
            ((2, 2, 1, 2, 2), false),
            ((2, 2, 2, 1, 1), false),
            ((0, 0, 0, 0, 0), true),
        ];
        for ((desired, replicas, updated, ready, available), ok) in cases {
            let (_, _, got) = super::deployment_readiness(&deployment(
                desired, replicas, updated, ready, available,
            ));
            assert_eq!(
                got, ok,
                "{desired} desired, {replicas} replicas, {updated} updated, {ready} ready"
            );
        }
    }

    #[test]
    fn a_missing_kind_counts_as_absent_like_a_missing_object() {
        // What kube-client makes of the API server's plain-text answer for a resource type it does not serve
        // (a CRD that is not installed), as seen on a cluster without the Prometheus Operator.
        let missing_kind = kube::Error::Api(Box::new(
            Status::failure("404 page not found", "Failed to parse error data").with_code(404),
        ));
        assert!(is_absent(&missing_kind));
        let missing_object = kube::Error::Api(Box::new(
            Status::failure("not found", "NotFound").with_code(404),
        ));
        assert!(is_absent(&missing_object));
        let forbidden = kube::Error::Api(Box::new(
            Status::failure("forbidden", "Forbidden").with_code(403),
        ));
        assert!(!is_absent(&forbidden));
    }
}
