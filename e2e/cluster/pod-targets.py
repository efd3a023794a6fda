"""Keeps a Prometheus file_sd targets file up to date with the running pods of the stack and the operator:
`pod-targets.py KUBECTL KUBECONFIG OUT` lists the pods every two seconds and writes one target per pod with a
container port named `http` or `http-metrics`, labelled with its job, component, namespace and pod. Debian's
Prometheus is built without Kubernetes service discovery, so e2e/cluster/prometheus.sh runs this instead."""
import json
import os
import subprocess
import sys
import time

kubectl, kubeconfig, out = sys.argv[1], sys.argv[2], sys.argv[3]
SELECTORS = ["app.kubernetes.io/part-of=cqrs-stack", "app.kubernetes.io/name=cqrs-operator"]


def pods() -> list:
    items = []
    for selector in SELECTORS:
        r = subprocess.run([kubectl, "--kubeconfig", kubeconfig, "get", "pods", "-A", "-o", "json", "-l", selector],
                           capture_output=True, text=True, timeout=20)
        if r.returncode == 0:
            items += json.loads(r.stdout)["items"]
    return items


def targets(items: list) -> list:
    found = []
    for pod in items:
        if pod["status"].get("phase") != "Running" or not pod["status"].get("podIP"):
            continue
        labels = pod["metadata"].get("labels", {})
        for c in pod["spec"]["containers"]:
            for p in c.get("ports", []):
                if p.get("name") in ("http", "http-metrics"):
                    found.append({
                        "targets": [f"{pod['status']['podIP']}:{p['containerPort']}"],
                        "labels": {
                            "job": labels.get("app.kubernetes.io/name", c["name"]),
                            "component": labels.get("app.kubernetes.io/component", c["name"]),
                            "namespace": pod["metadata"]["namespace"],
                            "pod": pod["metadata"]["name"],
                        },
                    })
    return found


while True:
    try:
        found = targets(pods())
        with open(out + ".tmp", "w") as f:
            json.dump(found, f)
        os.replace(out + ".tmp", out)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        print(f"pod-targets: {e}", file=sys.stderr, flush=True)
    time.sleep(2)
