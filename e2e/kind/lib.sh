#!/usr/bin/env bash
# The settings below are used by the scripts that source this file.
# shellcheck disable=SC2034
# Shared settings and helpers of the kind recipe (sourced by e2e.sh and down.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER="${KIND_CLUSTER:-cqrs-e2e}"
TAG="${IMAGE_TAG:-e2e}"
STRIMZI_VERSION="${STRIMZI_VERSION:-1.2.0}"
STACK_NS=cqrs
OPERATOR_NS=cqrs-system
KAFKA_NS=kafka
WAIT="${WAIT_TIMEOUT:-600s}"

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

require() {
  local missing=()
  for t in "$@"; do command -v "$t" >/dev/null || missing+=("$t"); done
  if ((${#missing[@]})); then die "missing tools: ${missing[*]} (this recipe needs Docker, kind, kubectl, helm)"; fi
}

kc() { kubectl --context "kind-$CLUSTER" "$@"; }
