//! The Helm chart, the manifests and the scripts, checked with the real tools (installed by
//! operator/scripts/install-tools.sh, never skipped): helm lint, kubeconform -strict with offline schemas,
//! server-side dry-run against the test API server, promtool, shellcheck, and a least-privilege check that
//! runs the controller as the chart's ServiceAccount.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::{Value, json};
use support::*;

use cqrs_operator::{build::kafka_topic_resource, crd::CqrsStack};

const CHART: &str = "charts/cqrs-operator";
const K8S_VERSION: &str = "1.34.0";

struct Tools {
    bin: PathBuf,
    schemas: PathBuf,
    crd_schemas: PathBuf,
}

fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let out =
            run(Command::new("bash").arg(repo_root().join("operator/scripts/install-tools.sh")))
                .expect("install-tools.sh");
        let line = out.lines().last().expect("install-tools.sh output");
        let (bin, schemas) = line.split_once(' ').expect("<bin> <schemas>");
        let crd_schemas = tempfile::Builder::new()
            .prefix("cqrs-crd-schemas-")
            .tempdir()
            .unwrap()
            .keep();
        write_crd_schemas(&crd_schemas);
        Tools {
            bin: bin.into(),
            schemas: schemas.into(),
            crd_schemas,
        }
    })
}

fn tool(name: &str) -> Command {
    let mut c = Command::new(tools().bin.join(name));
    c.current_dir(repo_root());
    c
}

/// JSON Schemas for kubeconform from the CRDs (ours, Strimzi, Prometheus Operator), strict like the built-in
/// ones: objects with declared properties reject unknown fields unless the CRD preserves them.
fn write_crd_schemas(dir: &Path) {
    let mut docs = vec![cqrs_operator::crd::crd_yaml().unwrap()];
    docs.extend(
        vendor_crds()
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap()),
    );
    for doc in docs {
        let crd: Value = serde_yaml::from_str(&doc).unwrap();
        let group = crd["spec"]["group"].as_str().unwrap();
        let kind = crd["spec"]["names"]["kind"]
            .as_str()
            .unwrap()
            .to_lowercase();
        for v in crd["spec"]["versions"].as_array().unwrap() {
            let mut schema = v["schema"]["openAPIV3Schema"].clone();
            strict(&mut schema);
            let props = schema["properties"].as_object_mut().unwrap();
            props
                .entry("apiVersion")
                .or_insert(json!({"type": "string"}));
            props.entry("kind").or_insert(json!({"type": "string"}));
            props.entry("metadata").or_insert(json!({"type": "object"}));
            let path = dir
                .join(group)
                .join(format!("{kind}_{}.json", v["name"].as_str().unwrap()));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, serde_json::to_vec(&schema).unwrap()).unwrap();
        }
    }
}

fn strict(s: &mut Value) {
    let Some(obj) = s.as_object_mut() else { return };
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    if obj.contains_key("properties") && !preserve && !obj.contains_key("additionalProperties") {
        obj.insert("additionalProperties".into(), json!(false));
    }
    for (k, v) in obj.iter_mut() {
        match k.as_str() {
            "properties" => v
                .as_object_mut()
                .into_iter()
                .flat_map(|m| m.values_mut())
                .for_each(strict),
            "items" | "additionalProperties" => strict(v),
            "allOf" | "anyOf" | "oneOf" => v.as_array_mut().into_iter().flatten().for_each(strict),
            _ => {}
        }
    }
}

/// Renders the chart; `sets` are `--set` values.
fn render(sets: &[&str]) -> String {
    let mut c = tool("helm");
    c.args([
        "template",
        "cqrs-operator",
        CHART,
        "--namespace",
        "cqrs-system",
        "--kube-version",
        K8S_VERSION,
    ]);
    for s in sets {
        c.args(["--set", s]);
    }
    run(&mut c).expect("helm template")
}

const ALL_ON: &[&str] = &[
    "serviceMonitor.enabled=true",
    "prometheusRule.enabled=true",
    "dashboards.enabled=true",
];

fn kubeconform(files: &[PathBuf]) {
    let t = tools();
    let mut c = tool("kubeconform");
    c.args(["-strict", "-summary", "-kubernetes-version", K8S_VERSION]);
    c.arg("-schema-location").arg(format!(
        "{}/{{{{ .NormalizedKubernetesVersion }}}}-local{{{{ .StrictSuffix }}}}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
        t.schemas.display()
    ));
    c.arg("-schema-location").arg(format!(
        "{}/{{{{ .Group }}}}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
        t.crd_schemas.display()
    ));
    c.args(files);
    let out = run(&mut c).expect("kubeconform");
    // Every resource must have been validated against a schema: none skipped, none missing.
    let summary = out.lines().last().unwrap_or_default();
    assert!(
        summary.contains("Invalid: 0, Errors: 0, Skipped: 0"),
        "{out}"
    );
    assert!(!summary.contains("Valid: 0,"), "{out}");
}

fn write_temp(name: &str, content: &str) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("cqrs-chart-")
        .tempdir()
        .unwrap()
        .keep();
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn manifest_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["manifests/kind", "manifests/samples"] {
        for e in std::fs::read_dir(repo_root().join(dir)).unwrap() {
            files.push(e.unwrap().path());
        }
    }
    files.sort();
    files
}

#[test]
fn helm_lint_passes_strict() {
    for sets in [
        &[][..],
        ALL_ON,
        &[
            "watchNamespace=shop",
            "networkPolicy.enabled=false",
            "serviceAccount.create=false",
        ],
    ] {
        let mut c = tool("helm");
        c.args(["lint", CHART, "--strict", "--kube-version", K8S_VERSION]);
        for s in sets {
            c.args(["--set", s]);
        }
        run(&mut c).unwrap();
    }
    // values.schema.json rejects what it should.
    let mut c = tool("helm");
    c.args([
        "lint",
        CHART,
        "--strict",
        "--set",
        "image.pullPolicy=Sometimes",
    ]);
    assert!(
        run(&mut c).is_err(),
        "an invalid value must fail the schema"
    );
}

#[test]
fn rendered_chart_and_manifests_pass_kubeconform_strict() {
    let mut files = vec![
        write_temp("all-on.yaml", &render(ALL_ON)),
        write_temp("namespaced.yaml", &render(&["watchNamespace=shop"])),
        repo_root().join("manifests/operator.yaml"),
        repo_root().join("manifests/crds/cqrsstacks.cqrs.dev.yaml"),
    ];
    files.extend(manifest_files());
    kubeconform(&files);
}

#[test]
fn kubeconform_rejects_a_broken_manifest() {
    // The check above can fail: an unknown field in a Deployment and in a CqrsStack are caught.
    let bad = render(&[]).replace(
        "terminationGracePeriodSeconds: 30",
        "terminationGracePeriodSeconds: 30\n      notAField: true",
    );
    assert!(bad.contains("notAField"));
    let p = write_temp("bad.yaml", &bad);
    let t = tools();
    let mut c = tool("kubeconform");
    c.args(["-strict", "-kubernetes-version", K8S_VERSION, "-schema-location"]).arg(format!(
        "{}/{{{{ .NormalizedKubernetesVersion }}}}-local{{{{ .StrictSuffix }}}}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
        t.schemas.display()
    ));
    c.arg(&p);
    assert!(
        run(&mut c).is_err(),
        "kubeconform must reject an unknown Deployment field"
    );
    let sample =
        std::fs::read_to_string(repo_root().join("manifests/samples/cqrsstack.yaml")).unwrap();
    let p = write_temp(
        "bad-stack.yaml",
        &sample.replace(
            "  gateway:\n    replicas: 2",
            "  gateway:\n    replicas: 2\n    replicaz: 3",
        ),
    );
    let mut c = tool("kubeconform");
    c.args(["-strict", "-schema-location"]).arg(format!(
        "{}/{{{{ .Group }}}}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
        t.crd_schemas.display()
    ));
    c.arg(&p);
    assert!(
        run(&mut c).is_err(),
        "kubeconform must reject an unknown CqrsStack field"
    );
}

fn kubectl_cmd() -> Command {
    let mut c = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()));
    c.arg("--kubeconfig").arg(&cluster().kubeconfig);
    c
}

fn ensure_namespace(ns: &str) {
    let yaml =
        run(kubectl_cmd().args(["create", "namespace", ns, "--dry-run=client", "-o", "yaml"]))
            .unwrap();
    let p = write_temp("ns.yaml", &yaml);
    run(kubectl_cmd().args(["apply", "-f"]).arg(p)).unwrap();
}

#[test]
fn rendered_chart_and_manifests_pass_server_side_dry_run() {
    for ns in ["cqrs-system", "cqrs", "kafka", "shop"] {
        ensure_namespace(ns);
    }
    let files = [
        write_temp("all-on.yaml", &render(ALL_ON)),
        write_temp("namespaced.yaml", &render(&["watchNamespace=shop"])),
        repo_root().join("manifests/operator.yaml"),
    ];
    for f in files.iter().chain(manifest_files().iter()) {
        let out = run(kubectl_cmd()
            .args(["apply", "--dry-run=server", "-f"])
            .arg(f))
        .unwrap();
        assert!(out.contains("(server dry run)"), "{}: {out}", f.display());
    }
}

#[test]
fn manifests_snapshot_matches_the_chart() {
    let want = render(&[]);
    let got =
        std::fs::read_to_string(repo_root().join("manifests/operator.yaml")).unwrap_or_default();
    assert!(
        got == want,
        "manifests/operator.yaml is out of date with the chart; run `just chart-snapshot`"
    );
}

#[test]
fn alert_rules_and_dashboard_queries_are_valid_promql() {
    run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo_root().join(CHART).join("rules/alerts.yaml")))
    .unwrap();
    // Each dashboard panel query, with template variables substituted, as a recording rule promtool parses.
    let mut rules = Vec::new();
    for e in std::fs::read_dir(repo_root().join(CHART).join("dashboards")).unwrap() {
        let d: Value = serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap().replace("$namespace", ".*");
                rules.push(
                    json!({"record": format!("dashboard:panel_{}", rules.len()), "expr": expr}),
                );
            }
        }
    }
    assert!(rules.len() >= 10);
    let file = write_temp(
        "dashboards.rules.yaml",
        &serde_yaml::to_string(&json!({"groups": [{"name": "dashboards", "rules": rules}]}))
            .unwrap(),
    );
    run(Command::new("promtool").args(["check", "rules"]).arg(file)).unwrap();
    // promtool must be able to fail.
    let bad = write_temp(
        "bad.rules.yaml",
        "groups: [{name: x, rules: [{record: 'a:b', expr: 'sum(rate(x[5m])'}]}]\n",
    );
    assert!(run(Command::new("promtool").args(["check", "rules"]).arg(bad)).is_err());
}

#[test]
fn shell_scripts_pass_shellcheck() {
    let _ = tools(); // installs shellcheck
    let mut scripts = vec![
        repo_root().join("operator/scripts/install-tools.sh"),
        repo_root().join("operator/tests/support/kube-up.sh"),
    ];
    for dir in ["e2e/kind", "e2e/cluster"] {
        for e in std::fs::read_dir(repo_root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "sh") {
                scripts.push(p);
            }
        }
    }
    scripts.push(repo_root().join(".ci/run"));
    scripts.push(repo_root().join(".ci/bootstrap"));
    assert!(scripts.len() >= 12, "{scripts:?}");
    run(Command::new("shellcheck")
        .args(["-x", "-S", "warning"])
        .args(&scripts))
    .unwrap();
}

#[test]
fn dockerfile_builds_every_binary_as_non_root() {
    // No Docker here: a static check that the multi-stage Dockerfile and the kind script agree.
    let df = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    assert!(df.matches("FROM ").count() >= 2, "multi-stage");
    assert!(
        df.contains("USER 65532:65532"),
        "non-root runtime user matching the pods' runAsUser"
    );
    let script = std::fs::read_to_string(repo_root().join("e2e/kind/e2e.sh")).unwrap();
    for bin in ["gateway", "mutation", "query", "operator"] {
        assert!(
            script.contains(&format!("build_image {bin} ")),
            "e2e.sh builds {bin}"
        );
    }
    // The local cluster builds the same Dockerfile with buildah, from binaries built on the host.
    assert!(
        df.contains("AS prebuilt") && df.contains("ARG RUNTIME_BASE"),
        "prebuilt target"
    );
    let images = std::fs::read_to_string(repo_root().join("e2e/cluster/images.sh")).unwrap();
    assert!(
        images.contains("--target prebuilt")
            && images.contains("BINS=(gateway mutation query operator)")
    );
}

/// The controller running as the chart's ServiceAccount (impersonated) can do its whole job: the ClusterRole
/// is sufficient. Its rules are the least privilege claimed in the chart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_rbac_is_enough_for_the_controller() {
    let admin = client().await;
    let release_ns = namespace(&admin, "rbac-op").await;
    let ns = namespace(&admin, "rbac-stack").await;
    let rendered = tokio::task::spawn_blocking({
        let release_ns = release_ns.clone();
        let ns = ns.clone();
        move || {
            let mut c = tool("helm");
            c.args([
                "template",
                "rbac",
                CHART,
                "--namespace",
                &release_ns,
                "--kube-version",
                K8S_VERSION,
                "--set",
            ])
            .arg(format!("watchNamespace={ns}"));
            let yaml = run(&mut c).unwrap();
            let p = write_temp("rbac.yaml", &yaml);
            run(kubectl_cmd().args(["apply", "-f"]).arg(p)).unwrap();
        }
    });
    rendered.await.unwrap();

    let kubeconfig = tokio::task::spawn_blocking(|| cluster().kubeconfig.clone())
        .await
        .unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&kubeconfig).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    config.auth_info.impersonate = Some(format!(
        "system:serviceaccount:{release_ns}:rbac-cqrs-operator"
    ));
    let as_operator = Client::try_from(config).unwrap();
    let op = Operator::start(as_operator.clone(), config_for(&ns));

    let stacks: Api<CqrsStack> = Api::namespaced(admin.clone(), &ns);
    let mut stack = sample_stack("r");
    stack.spec.monitoring.service_monitor = true;
    stack.spec.query.autoscaling =
        Some(serde_json::from_value(json!({"minReplicas": 1, "maxReplicas": 3})).unwrap());
    stacks.create(&PostParams::default(), &stack).await.unwrap();
    wait_for(
        "status written by the operator's ServiceAccount",
        TIMEOUT,
        || async {
            let s = stacks.get("r").await.ok()?;
            condition(&s, "Ready")
                .filter(|c| c.1 == "DeploymentsNotReady")
                .map(|_| ())
        },
    )
    .await;
    // Invalid spec: the Warning Event is allowed too.
    assert_eq!(
        op.metric("cqrs_operator_reconcile_failures_total"),
        0.0,
        "no permission errors"
    );
    // Partitions decrease path reads topics; deletion patches them (Retain).
    let topics: Api<DynamicObject> =
        Api::namespaced_with(admin.clone(), &ns, &kafka_topic_resource());
    assert!(topics.get_opt("shop.users").await.unwrap().is_some());
    assert!(
        Api::<Deployment>::namespaced(admin.clone(), &ns)
            .get_opt("r-query")
            .await
            .unwrap()
            .is_some()
    );
    stacks.patch("r", &PatchParams::default(), &Patch::Merge(json!({"spec": {"monitoring": {"serviceMonitor": false}, "query": {"autoscaling": null}}}))).await.unwrap();
    stacks.delete("r", &Default::default()).await.unwrap();
    wait_for(
        "finalizer removed by the operator's ServiceAccount",
        TIMEOUT,
        || async { stacks.get_opt("r").await.ok()?.is_none().then_some(()) },
    )
    .await;
    let t = topics.get("shop.users").await.unwrap();
    assert!(
        t.metadata.owner_references.unwrap_or_default().is_empty(),
        "Retain orphaned the topic"
    );
    assert_eq!(
        op.metric("cqrs_operator_reconcile_failures_total"),
        0.0,
        "no permission errors"
    );
    op.stop().await;
}

/// A permission error is a reconcile failure (counted by reason, retried with backoff, no status written from
/// a half-applied stack), and the operator recovers by itself once the permission is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permission_error_is_retried_with_backoff_and_recovers_when_fixed() {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    let admin = client().await;
    let release_ns = namespace(&admin, "rbac2-op").await;
    let ns = namespace(&admin, "rbac2-stack").await;
    let release = release_ns.clone();
    tokio::task::spawn_blocking({
        let (release, release_ns, ns) = (release.clone(), release_ns.clone(), ns.clone());
        move || {
            let mut c = tool("helm");
            c.args([
                "template",
                &release,
                CHART,
                "--namespace",
                &release_ns,
                "--kube-version",
                K8S_VERSION,
                "--set",
            ])
            .arg(format!("watchNamespace={ns}"));
            let p = write_temp("rbac2.yaml", &run(&mut c).unwrap());
            run(kubectl_cmd().args(["apply", "-f"]).arg(p)).unwrap();
        }
    })
    .await
    .unwrap();
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let role_name = format!("{release}-cqrs-operator");
    let full_rules = roles.get(&role_name).await.unwrap().rules.unwrap();
    let without_pdb: Vec<_> = full_rules
        .iter()
        .filter(|r| r.api_groups.as_deref() != Some(&["policy".to_owned()][..]))
        .cloned()
        .collect();
    assert_eq!(without_pdb.len() + 1, full_rules.len());
    roles
        .patch(
            &role_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"rules": without_pdb})),
        )
        .await
        .unwrap();

    let kubeconfig = tokio::task::spawn_blocking(|| cluster().kubeconfig.clone())
        .await
        .unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&kubeconfig).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    config.auth_info.impersonate = Some(format!(
        "system:serviceaccount:{release_ns}:{release}-cqrs-operator"
    ));
    let op = Operator::start(Client::try_from(config).unwrap(), config_for(&ns));
    let stacks: Api<CqrsStack> = Api::namespaced(admin.clone(), &ns);
    stacks
        .create(&PostParams::default(), &sample_stack("f"))
        .await
        .unwrap();

    let forbidden = || {
        op.registry
            .gather()
            .iter()
            .filter(|f| f.name() == "cqrs_operator_reconcile_failures_total")
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "reason" && l.value() == "forbidden")
            })
            .map(|m| m.get_counter().get_value())
            .sum::<f64>()
    };
    wait_for("two forbidden failures (a retry)", TIMEOUT, || async {
        (forbidden() >= 2.0).then_some(())
    })
    .await;
    assert!(
        stacks.get("f").await.unwrap().status.is_none(),
        "no status from a half-applied stack"
    );

    roles
        .patch(
            &role_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"rules": full_rules})),
        )
        .await
        .unwrap();
    wait_for(
        "recovery after the permission is granted",
        TIMEOUT,
        || async {
            let s = stacks.get("f").await.ok()?;
            condition(&s, "Ready")
                .filter(|c| c.1 == "DeploymentsNotReady")
                .map(|_| ())
        },
    )
    .await;
    op.stop().await;
}
