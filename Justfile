# Recipes for the CQRS platform. On a fresh machine run them through `bash .ci/bootstrap <recipe>`, which
# installs `just` and the system packages first.

set shell := ["bash", "-euo", "pipefail", "-c"]

export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", justfile_directory() / "target")
bin := CARGO_TARGET_DIR / "debug"

# List the recipes.
default:
    @just --list

# Bring up PostgreSQL, Kafka, the Mongo-wire server, mutation, query and gateway; serve until Ctrl-C.
# (It builds what `just test` builds, so the two share one cache: a per-package build would resolve other
# dependency features and compile everything twice.)
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
generate:
    cargo run -q -p cqrs-events --bin gen-schemas

# The Kubernetes path on kind (needs Docker and kind; see docs/OPERATOR.md).
e2e:
    @echo "filled in by the operator work: see e2e/kind/"
    @exit 1
