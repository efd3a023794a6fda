# Shared by the provisioning scripts: where the cache lives and the pinned versions.
# Everything is installed under one cache directory so a fresh machine provisions itself and a warm one is fast.
set -euo pipefail
CQRS_CACHE="${CQRS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cqrs-stack}"
KAFKA_VERSION=4.3.1
SECANTUS_VERSION=0.7.0b3
FERRETDB_VERSION=1.24.2
JUST_VERSION=1.59.0
K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.22.0
KUBECONFORM_VERSION=v0.7.0
KUBEVALIDATE_VERSION=1.37.0
mkdir -p "$CQRS_CACHE"
export GOPATH="$CQRS_CACHE/go" GOMODCACHE="$CQRS_CACHE/go/pkg/mod" GOCACHE="$CQRS_CACHE/go/build-cache"
export GOFLAGS="-modcacherw"
log() { printf '[provision] %s\n' "$*" >&2; }
# A "done" marker per install step: the step is skipped when the marker exists, so runs are idempotent
# and an interrupted install is redone rather than trusted.
done_marker() { printf '%s/.done-%s' "$CQRS_CACHE" "$1"; }
