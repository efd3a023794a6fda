//! Pure validation of a `CqrsStackSpec`: the CEL rules of the CRD again (the installed CRD may be older than
//! the operator) plus the checks CEL cannot express. The only way to get a [`ValidSpec`] is through [`validate`].

use std::fmt;

use crate::crd::{ComponentSpec, CqrsStackSpec, TopicMode};

/// Longest stack name: child names append up to 9 characters (`-mutation`) and must stay DNS-1035 labels.
pub const MAX_NAME_LEN: usize = 54;

/// One reason a spec cannot be reconciled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// JSON path of the offending field, e.g. `spec.kafka.partitions`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A spec that passed [`validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSpec(CqrsStackSpec);

impl ValidSpec {
    pub fn spec(&self) -> &CqrsStackSpec {
        &self.0
    }
}

/// Checks the stack name and spec; every problem is reported, not just the first.
pub fn validate(name: &str, spec: &CqrsStackSpec) -> Result<ValidSpec, Vec<Invalid>> {
    let mut errs = Vec::new();
    if name.len() > MAX_NAME_LEN {
        errs.push(invalid("metadata.name", format!("must be at most {MAX_NAME_LEN} characters (child names add a suffix such as -mutation)")));
    }
    if !name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
        errs.push(invalid(
            "metadata.name",
            "must start with a lowercase letter (Service names are DNS-1035 labels)",
        ));
    }
    for (field, image) in [
        ("gateway", &spec.images.gateway),
        ("mutation", &spec.images.mutation),
        ("query", &spec.images.query),
    ] {
        if image.trim().is_empty() || image.chars().any(char::is_whitespace) {
            errs.push(invalid(
                format!("spec.images.{field}"),
                "must be a non-empty image reference without spaces",
            ));
        }
    }
    for (field, c) in [
        ("gateway", &spec.gateway),
        ("mutation", &spec.mutation),
        ("query", &spec.query),
    ] {
        component(field, c, &mut errs);
    }
    for (field, v) in [
        ("spec.postgres.secretName", &spec.postgres.secret_name),
        ("spec.postgres.key", &spec.postgres.key),
        ("spec.mongo.secretName", &spec.mongo.secret_name),
        ("spec.mongo.key", &spec.mongo.key),
        ("spec.mongo.database", &spec.mongo.database),
        ("spec.auth.secretName", &spec.auth.secret_name),
        ("spec.kafka.bootstrapServers", &spec.kafka.bootstrap_servers),
    ] {
        if v.trim().is_empty() {
            errs.push(invalid(field, "must not be empty"));
        }
    }
    let k = &spec.kafka;
    if k.topic_mode == TopicMode::Strimzi && k.strimzi_cluster.as_deref().is_none_or(str::is_empty)
    {
        errs.push(invalid(
            "spec.kafka.strimziCluster",
            "is required when kafka.topicMode is strimzi",
        ));
    }
    if !valid_prefix(&k.topic_prefix) {
        errs.push(invalid(
            "spec.kafka.topicPrefix",
            "must be lowercase letters, digits, '.' or '-', starting and ending with a letter or digit",
        ));
    }
    if k.partitions < 1 {
        errs.push(invalid("spec.kafka.partitions", "must be at least 1"));
    }
    if k.replicas < 1 {
        errs.push(invalid("spec.kafka.replicas", "must be at least 1"));
    }
    for (key, value) in &k.config {
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_')
        {
            errs.push(invalid(
                format!("spec.kafka.config.{key}"),
                "is not a Kafka topic configuration name",
            ));
        }
        if (key == "retention.ms" || key == "retention.bytes") && value.parse::<i64>().is_err() {
            errs.push(invalid(
                format!("spec.kafka.config.{key}"),
                "must be an integer (-1 keeps events forever)",
            ));
        }
    }
    if spec.projections.generation < 1 {
        errs.push(invalid("spec.projections.generation", "must be at least 1"));
    }
    if let Some(interval) = &spec.monitoring.interval
        && !valid_duration(interval)
    {
        errs.push(invalid(
            "spec.monitoring.interval",
            "must be a Prometheus duration such as 30s or 1m",
        ));
    }
    if errs.is_empty() {
        Ok(ValidSpec(spec.clone()))
    } else {
        Err(errs)
    }
}

fn component(field: &str, c: &ComponentSpec, errs: &mut Vec<Invalid>) {
    if c.replicas < 0 {
        errs.push(invalid(
            format!("spec.{field}.replicas"),
            "must not be negative",
        ));
    }
    if let Some(a) = &c.autoscaling {
        if a.min_replicas < 1 {
            errs.push(invalid(
                format!("spec.{field}.autoscaling.minReplicas"),
                "must be at least 1",
            ));
        }
        if a.min_replicas > a.max_replicas {
            errs.push(invalid(
                format!("spec.{field}.autoscaling"),
                "minReplicas must not exceed maxReplicas",
            ));
        }
        if !(1..=100).contains(&a.target_cpu_utilization_percentage) {
            errs.push(invalid(
                format!("spec.{field}.autoscaling.targetCpuUtilizationPercentage"),
                "must be between 1 and 100",
            ));
        }
    }
    if let Some(r) = &c.resources {
        // The API server rejects a Deployment with an unknown unqualified resource name; say so up front.
        for (kind, map) in [("requests", &r.requests), ("limits", &r.limits)] {
            for (name, q) in map.iter().flatten() {
                let known = matches!(name.as_str(), "cpu" | "memory" | "ephemeral-storage")
                    || name.starts_with("hugepages-")
                    || name.contains('/');
                if !known {
                    errs.push(invalid(
                        format!("spec.{field}.resources.{kind}.{name}"),
                        "is not a resource name (cpu, memory, ephemeral-storage, hugepages-*, or a domain-qualified name)",
                    ));
                } else if parse_quantity(&q.0).is_none() {
                    errs.push(invalid(
                        format!("spec.{field}.resources.{kind}.{name}"),
                        "is not a quantity",
                    ));
                }
            }
        }
        let (Some(requests), Some(limits)) = (&r.requests, &r.limits) else {
            return;
        };
        for (resource, request) in requests {
            let Some(limit) = limits.get(resource) else {
                continue;
            };
            match (parse_quantity(&request.0), parse_quantity(&limit.0)) {
                (Some(req), Some(lim)) if req > lim => errs.push(invalid(
                    format!("spec.{field}.resources.requests.{resource}"),
                    format!("request {} exceeds limit {}", request.0, limit.0),
                )),
                (None, _) => errs.push(invalid(
                    format!("spec.{field}.resources.requests.{resource}"),
                    "is not a quantity",
                )),
                (_, None) => errs.push(invalid(
                    format!("spec.{field}.resources.limits.{resource}"),
                    "is not a quantity",
                )),
                _ => {}
            }
        }
    }
}

fn valid_prefix(p: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !p.is_empty()
        && p.chars().all(|c| ok_char(c) || c == '.' || c == '-')
        && p.chars().next().is_some_and(ok_char)
        && p.chars().last().is_some_and(ok_char)
}

fn valid_duration(s: &str) -> bool {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    !digits.is_empty() && matches!(&s[digits.len()..], "ms" | "s" | "m" | "h")
}

/// Parses a Kubernetes quantity (`100m`, `0.5`, `128Mi`, `1G`, `1e3`) into a number of base units.
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0_f64.powi(2),
        "Gi" => 1024.0_f64.powi(3),
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        "Ei" => 1024.0_f64.powi(6),
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    Some(n * mult)
}
