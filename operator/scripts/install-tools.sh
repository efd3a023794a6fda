#!/usr/bin/env bash
# Installs the chart-checking tools into the shared cache (idempotent): helm and kubeconform from Go modules,
# offline Kubernetes JSON schemas from the PyPI package kubernetes-validate, and shellcheck from apt.
# Prints "<bin-dir> <schema-dir>" on stdout.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/../../crates/devstack/scripts/common.sh"
bin="$CQRS_CACHE/tools/bin"
venv="$CQRS_CACHE/venv-kubernetes-validate-$KUBEVALIDATE_VERSION"
SCHEMA_K8S_VERSION="${SCHEMA_K8S_VERSION:-1.34.0}"
mkdir -p "$bin"

if [[ ! -x "$bin/helm" || ! -f "$(done_marker helm-$HELM_VERSION)" ]]; then
  log "building helm $HELM_VERSION"
  command -v go >/dev/null || { apt-get update -qq && apt-get install -y -qq golang-go; }
  GOBIN="$bin" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
  touch "$(done_marker helm-$HELM_VERSION)"
fi
if [[ ! -x "$bin/kubeconform" || ! -f "$(done_marker kubeconform-$KUBECONFORM_VERSION)" ]]; then
  log "building kubeconform $KUBECONFORM_VERSION"
  GOBIN="$bin" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" \
    "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION" >&2
  touch "$(done_marker kubeconform-$KUBECONFORM_VERSION)"
fi
if [[ ! -f "$(done_marker kubernetes-validate-$KUBEVALIDATE_VERSION)" ]]; then
  log "installing kubernetes-validate $KUBEVALIDATE_VERSION (offline JSON schemas)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "kubernetes-validate==$KUBEVALIDATE_VERSION" >&2
  touch "$(done_marker kubernetes-validate-$KUBEVALIDATE_VERSION)"
fi
if ! command -v shellcheck >/dev/null; then
  log "installing shellcheck"
  apt-get update -qq >&2 && apt-get install -y -qq shellcheck >&2
fi
src="$(find "$venv" -type d -name kubernetes-json-schema -print -quit)"
[[ -n "$src" ]] || { echo "kubernetes-json-schema not found in $venv" >&2; exit 1; }
# kubernetes-validate's schemas reference "/api/_definitions.json" (resolved by its own loader); kubeconform
# resolves references as URLs, so a copy with absolute file:// references is made for the Kubernetes
# version the tests target.
schemas="$CQRS_CACHE/kubeconform-schemas-$KUBEVALIDATE_VERSION"
if [[ ! -f "$(done_marker kubeconform-schemas-$KUBEVALIDATE_VERSION-$SCHEMA_K8S_VERSION)" ]]; then
  for flavour in local local-strict; do
    dir="$schemas/v$SCHEMA_K8S_VERSION-$flavour"; mkdir -p "$dir"
    for f in "$src/v$SCHEMA_K8S_VERSION-$flavour"/*.json; do
      sed "s#\"/api/_definitions.json#\"file://$dir/_definitions.json#g" "$f" > "$dir/${f##*/}"
    done
  done
  touch "$(done_marker kubeconform-schemas-$KUBEVALIDATE_VERSION-$SCHEMA_K8S_VERSION)"
fi
echo "$bin $schemas"
