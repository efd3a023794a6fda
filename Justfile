# Recipes for the CQRS platform. On a fresh machine run them through `bash .ci/bootstrap <recipe>`, which
# installs `just` and the system packages first.

set shell := ["bash", "-euo", "pipefail", "-c"]

export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", justfile_directory() / "target")
bin := CARGO_TARGET_DIR / "debug"

# List the recipes.
default:
    @just --list

# It builds what `just test` builds, so the two share one cache (a per-package build would resolve other
# dependency features and compile everything twice).
# Bring up PostgreSQL, Kafka, the Mongo-wire server, mutation, query and gateway; serve until Ctrl-C.
up:
    cargo build --workspace --all-targets
    {{bin}}/devstack up --bin-dir {{bin}}

# Stop a local stack left running (`just down --purge` also deletes its data).
down *args:
    cargo build --workspace --all-targets -q
    {{bin}}/devstack down {{args}}

# Run the whole test suite against real servers (started once for the run, stopped at the end).
test *args:
    #!/usr/bin/env bash
    set -uo pipefail
    cargo build --workspace --all-targets || exit 1
    export CQRS_TEST_PROFILE="test-$$"
    trap '{{bin}}/devstack stop --profile "$CQRS_TEST_PROFILE" >/dev/null 2>&1' EXIT
    {{bin}}/devstack start --profile "$CQRS_TEST_PROFILE" >/dev/null || exit 1
    log=$(mktemp)
    cargo test --workspace --no-fail-fast {{args}} 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    passed=$(grep -oE 'test result: [A-Za-z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
    failed=$(grep -oE '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
    rm -f "$log"
    echo
    echo "${passed} passed, ${failed} failed"
    exit $status

# Formatting and clippy (warnings are errors).
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Regenerate checked-in artifacts (event schemas, CRD YAML, rendered chart); tests fail when they drift.
generate: crdgen chart-snapshot
    cargo run -q -p cqrs-events --bin gen-schemas

# Regenerate the CqrsStack CRD from the Rust types (drift-checked by operator/tests/generated.rs).
crdgen:
    cargo build -q -p cqrs-operator --bin crdgen
    {{bin}}/crdgen > charts/cqrs-operator/crds/cqrsstacks.cqrs.dev.yaml
    cp charts/cqrs-operator/crds/cqrsstacks.cqrs.dev.yaml manifests/crds/cqrsstacks.cqrs.dev.yaml

# Regenerate manifests/operator.yaml, the rendered chart with default values (drift-checked by operator/tests/chart.rs).
chart-snapshot:
    #!/usr/bin/env bash
    set -euo pipefail
    read -r tools _ < <(bash operator/scripts/install-tools.sh)
    "$tools/helm" template cqrs-operator charts/cqrs-operator --namespace cqrs-system --kube-version 1.34.0 > manifests/operator.yaml

# Chart checks only: helm lint, kubeconform -strict, server-side dry-run, promtool, shellcheck, RBAC sufficiency.
chart-check:
    cargo test -p cqrs-operator --test chart --test generated

# Run the operator locally against the cluster of your current kubeconfig context.
operator *args:
    cargo run -p cqrs-operator --bin operator -- {{args}}

# The Kubernetes path end to end: on kind when Docker and kind are there (e2e/kind/e2e.sh), else on the local
# single-node cluster (e2e/cluster/e2e.sh: chart, databases, a CqrsStack, seed + hostile, day-2 operations under
# load, Prometheus). `KEEP_CLUSTER=1 just e2e` keeps the cluster. See docs/OPERATOR.md.
e2e:
    #!/usr/bin/env bash
    set -euo pipefail
    if command -v docker >/dev/null && command -v kind >/dev/null && docker info >/dev/null 2>&1; then
        exec bash e2e/kind/e2e.sh
    fi
    exec bash e2e/cluster/e2e.sh

# Delete the kind cluster left by `KEEP_CLUSTER=1 just e2e` (or the local cluster, when there is no kind).
e2e-down:
    #!/usr/bin/env bash
    if command -v kind >/dev/null && kind get clusters 2>/dev/null | grep -qx "${KIND_CLUSTER:-cqrs-e2e}"; then
        exec bash e2e/kind/down.sh
    fi
    exec bash e2e/cluster/down.sh

# A real single-node Kubernetes 1.34 cluster on this machine without Docker (root; reuses a running one).
# Prints `export KUBECONFIG=…`.
cluster-up:
    bash e2e/cluster/up.sh

# Remove everything `just cluster-up` created, and say what was removed.
cluster-down:
    bash e2e/cluster/down.sh

# Build the service and operator images with buildah from the Dockerfile and import them into the local cluster.
cluster-images tag="":
    bash e2e/cluster/images.sh {{tag}}

# Print a development token for the local stack (role: reader, writer or admin).
token role="admin" ttl="24h":
    cargo build -q -p cqrs-gateway --bin gateway
    {{bin}}/gateway mint-token --role {{role}} --ttl {{ttl}} --secret-file "${CQRS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cqrs-stack}/stacks/local/jwt-secret"

e2e_bin := CARGO_TARGET_DIR / "release" / "cqrs-e2e"

# `just scenario --private` runs it on servers of its own instead of the stack of `just up`.
# The seed's scenario at full scale, 300k users/products/orders, every record read back and checked.
scenario *args:
    cargo build --release -p cqrs-e2e -p cqrs-mutation -p cqrs-query -p cqrs-gateway
    CQRS_BIN_DIR={{CARGO_TARGET_DIR}}/release {{e2e_bin}} scenario seed --users 300000 --products 300000 --orders 300000 --concurrency 128 {{args}}

# Raw baselines (pgbench, Mongo-wire insert_many, Kafka produce) and a ramp through the gateway; JSON + SVG in e2e/out/.
bench *args:
    cargo build --release -p cqrs-e2e -p cqrs-mutation -p cqrs-query -p cqrs-gateway
    CQRS_BIN_DIR={{CARGO_TARGET_DIR}}/release {{e2e_bin}} bench {{args}}

# kill -9 of mutation, query, Kafka and the Mongo-wire server, three times each, under load; 0 lost / 0 duplicated.
chaos *args:
    cargo build --release -p cqrs-e2e -p cqrs-mutation -p cqrs-query -p cqrs-gateway
    CQRS_BIN_DIR={{CARGO_TARGET_DIR}}/release {{e2e_bin}} chaos --rounds 3 {{args}}

# Hostile input against the stack of `just up`: only documented 4xx, no 5xx, nothing stored.
hostile *args:
    cargo build --release -p cqrs-e2e
    {{e2e_bin}} hostile {{args}}

# Gateway overhead: GET /product/:id through the gateway vs directly against an upstream, same run.
bench-gateway *args:
    cargo build --release -p cqrs-gateway --bin gateway-bench
    {{CARGO_TARGET_DIR}}/release/gateway-bench {{args}}

# Write side: POST /user at 1/16/64/256 clients vs pgbench of the same transaction on a durable PostgreSQL.
bench-mutation *args:
    cargo build --release -p cqrs-mutation --bin mutation-bench
    {{CARGO_TARGET_DIR}}/release/mutation-bench {{args}}

# Read side: projection throughput at batch sizes 1/100/1000 vs the Mongo-wire server's raw rates.
bench-query *args:
    cargo build --release -p cqrs-query --bin query-bench
    {{CARGO_TARGET_DIR}}/release/query-bench {{args}}
