#!/usr/bin/env bash
# Settings and helpers of the local single-node cluster (sourced by up.sh, down.sh, images.sh and e2e.sh).
# The cluster is real Kubernetes: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
# kube-proxy and CoreDNS built from Go modules (crates/devstack/scripts/install-k8s.sh), Debian's containerd, runc
# and CNI plugins. It needs root (network namespaces, iptables, mounts, cgroups).
# shellcheck disable=SC2034
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CQRS_CACHE="${CQRS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cqrs-stack}"
# Everything the cluster creates at run time lives here; `down` deletes it.
CLUSTER_DIR="${CQRS_CLUSTER_DIR:-$CQRS_CACHE/cluster}"
# Images built for the cluster (kept across up/down, keyed by content).
IMAGE_DIR="$CQRS_CACHE/images"
PKI="$CLUSTER_DIR/pki"
CONF="$CLUSTER_DIR/conf"
LOGS="$CLUSTER_DIR/logs"
PIDS="$CLUSTER_DIR/pids"
SOCK="$CLUSTER_DIR/containerd/containerd.sock"
KUBECONFIG_ADMIN="$CLUSTER_DIR/admin.kubeconfig"

# Addresses outside the private ranges (this workplace flags traffic to 10/8, 172.16/12, 192.168/16): pods and
# Services get the benchmarking range 198.18.0.0/15. Nothing is routed off the machine (see egress_guard).
POD_CIDR=198.18.0.0/24
SERVICE_CIDR=198.19.0.0/16
KUBERNETES_SERVICE_IP=198.19.0.1
DNS_IP=198.19.0.10
BRIDGE=cqrs0
CNI_NETWORK=cqrs
CLUSTER_DOMAIN=cluster.local

# Non-default ports, so the cluster can share the machine with the test API servers and a developer's own.
ETCD_PORT=22379
ETCD_PEER_PORT=22380
APISERVER_PORT=16443
KUBELET_PORT=20250
KUBELET_HEALTHZ_PORT=20248
KCM_PORT=20257
SCHEDULER_PORT=20259
PROXY_METRICS_PORT=20249
PROXY_HEALTHZ_PORT=20256

COREDNS_IMAGE=cqrs/coredns:local
PAUSE_IMAGE=docker.io/cqrs/pause:local

# The node's address: the first global IPv4 address of the interface the default route uses (the machine's own
# address; pods reach servers on the host there, as they would a managed database). CQRS_NODE_IP overrides it.
node_ip() {
  if [[ -n "${CQRS_NODE_IP:-}" ]]; then echo "$CQRS_NODE_IP"; return; fi
  local dev
  dev="$(ip -4 route show default | awk '{for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')"
  [[ -n "$dev" ]] || dev="$(ip -4 -o addr show scope global | awk '{print $2; exit}')"
  ip -4 -o addr show dev "$dev" scope global | awk '{split($4, a, "/"); print a[1]; exit}'
}
NODE_NAME="$(hostname | tr '[:upper:]' '[:lower:]')"

log() { printf '[cluster %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }

k8s_bin() { bash "$ROOT/crates/devstack/scripts/install-k8s.sh"; }

kc() { "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

ctr_() { ctr --address "$SOCK" -n k8s.io "$@"; }

# pid_alive NAME: the process recorded for NAME runs.
pid_alive() { [[ -f "$PIDS/$1" ]] && kill -0 "$(cat "$PIDS/$1")" 2>/dev/null; }

# The packages the node needs, from Debian.
ensure_packages() {
  local need=()
  command -v containerd >/dev/null || need+=(containerd)
  command -v runc >/dev/null || need+=(runc)
  [[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
  command -v iptables >/dev/null || need+=(iptables)
  command -v conntrack >/dev/null || need+=(conntrack)
  command -v openssl >/dev/null || need+=(openssl)
  if ((${#need[@]})); then
    [[ $(id -u) -eq 0 ]] || die "please install: ${need[*]}"
    log "installing ${need[*]} (Debian)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
  fi
}

# mkimage REF ROOTFS OUT.tar ENTRYPOINT_JSON: a one-layer image in docker-save layout, for `ctr images import`.
mkimage() {
  local ref=$1 rootfs=$2 out=$3 entrypoint=$4 work layer_sum config_sum
  work="$(mktemp -d)"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$rootfs" -cf "$work/layer.tar" .
  layer_sum="$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
  mkdir "$work/$layer_sum" && mv "$work/layer.tar" "$work/$layer_sum/layer.tar"
  printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":%s,"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"created":"1970-01-01T00:00:00Z","history":[{"created":"1970-01-01T00:00:00Z","created_by":"e2e/cluster/lib.sh mkimage"}]}' \
    "$entrypoint" "$layer_sum" > "$work/config.json"
  config_sum="$(sha256sum "$work/config.json" | cut -d' ' -f1)"
  mv "$work/config.json" "$work/$config_sum.json"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' "$config_sum" "$ref" "$layer_sum" \
    > "$work/manifest.json"
  tar -C "$work" -cf "$out.tmp" manifest.json "$config_sum.json" "$layer_sum"
  mv "$out.tmp" "$out"
  rm -rf "$work"
}

# wait_for WHAT SECONDS CMD...: run CMD until it succeeds; fail after SECONDS with WHAT.
wait_for() {
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${seconds}s waiting for $what (logs: $LOGS)"
    sleep 0.5
  done
}
