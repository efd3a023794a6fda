#!/usr/bin/env bash
# Builds every Kubernetes binary this project runs from Go modules into the cache (idempotent; prints the bin dir):
# kube-apiserver and etcd (the operator's integration tests), and kube-controller-manager, kube-scheduler,
# kubelet, kube-proxy, kubectl, CoreDNS and the pod sandbox `pause` (the local cluster of `just cluster-up`).
# No registry ships these binaries and there is no Docker, so we build them. They come from one wrapper module
# (k8s-wrapper/, its go.sum pins every dependency) in ONE `go build` invocation: the binaries share most of their
# packages (client-go, apiserver, grpc, etcd's client), and one invocation compiles each shared package once and
# keeps both cores busy until the last link.
here="$(cd "$(dirname "$0")" && pwd)"; . "$here/common.sh"
src="$(cd "$here/../k8s-wrapper" && pwd)"
grep -q "k8s.io/kubernetes $K8S_VERSION\$" "$src/go.mod" || {
  log "k8s-wrapper/go.mod does not require k8s.io/kubernetes $K8S_VERSION (K8S_VERSION in common.sh)"; exit 1; }
grep -q "go.etcd.io/etcd/server/v3 $ETCD_VERSION\$" "$src/go.mod" || {
  log "k8s-wrapper/go.mod does not require etcd $ETCD_VERSION (ETCD_VERSION in common.sh)"; exit 1; }
# Keyed by the wrapper's sources, so an edit to go.mod, go.sum or a command rebuilds the set.
key="$(cd "$src" && cat go.mod go.sum $(find cmd -name '*.go' | sort) | sha256sum | cut -c1-12)"
dir="$CQRS_CACHE/k8s-$K8S_VERSION"
bin="$dir/bin-$key"
marker="$(done_marker "k8s-$K8S_VERSION-$key")"
if [[ -f "$marker" ]]; then echo "$bin"; exit 0; fi
command -v go >/dev/null || { log "installing golang"; apt-get update -qq && apt-get install -y -qq golang-go; }
mkdir -p "$dir"
# One build at a time: .ci/run starts this in the background while test binaries may ask for it too.
exec 9>"$dir/.build.lock"; flock 9
if [[ ! -f "$marker" ]]; then
  log "building Kubernetes $K8S_VERSION, etcd $ETCD_VERSION and CoreDNS in one go build (cold: 15-25 minutes)"
  minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  tmp="$bin.tmp.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  start=$(date +%s)
  (cd "$src" && CGO_ENABLED=0 go build -mod=readonly -buildvcs=false -trimpath -ldflags "$ld" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy \
    k8s.io/kubernetes/cmd/kubectl go.etcd.io/etcd/server/v3 ./cmd/coredns ./cmd/pause) >&2
  # etcd's main package is its module root (go.etcd.io/etcd/server/v3): go build names it `server`.
  mv "$tmp/server" "$tmp/etcd"
  rm -rf "$bin"; mv "$tmp" "$bin"
  log "built $(ls "$bin" | tr '\n' ' ')in $(( $(date +%s) - start )) s"
  touch "$marker"
  # Sets built from earlier wrapper sources are dead weight now.
  for old in "$dir"/bin-* "$CQRS_CACHE"/.done-k8s-*; do
    [[ "$old" == "$bin" || "$old" == "$marker" ]] || rm -rf "$old"
  done
fi
echo "$bin"
