#!/usr/bin/env bash
# Builds kube-apiserver and etcd from Go modules into the cache (idempotent; several minutes cold).
# There is no registry that ships these binaries, and no Docker; the operator's integration tests need a real
# API server (CRD validation, CEL rules, server-side apply, status subresource), so we build them.
here="$(cd "$(dirname "$0")" && pwd)"; . "$here/common.sh"
bin="$CQRS_CACHE/k8s-$K8S_VERSION/bin"
marker="$(done_marker k8s-$K8S_VERSION-etcd-$ETCD_VERSION)"
if [[ -f "$marker" ]]; then echo "$bin"; exit 0; fi
command -v go >/dev/null || { log "installing golang"; apt-get update -qq && apt-get install -y -qq golang-go; }
mkdir -p "$bin"
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
staging_version="v0.${K8S_VERSION#v1.}"

if [[ ! -x "$bin/kube-apiserver" ]]; then
  log "building kube-apiserver $K8S_VERSION (cold: several minutes)"
  work="$CQRS_CACHE/k8s-$K8S_VERSION/wrapper"; mkdir -p "$work"; cd "$work"
  # k8s.io/kubernetes replaces every staging module with a local path; as a dependency those replaces are
  # ignored, so we repeat them pointing at the published staging modules of the same release.
  gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')"
  {
    echo "module cqrs.local/k8s-wrapper"
    echo "go 1.24"
    echo "require k8s.io/kubernetes $K8S_VERSION"
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/src/k8s\.io/[a-z0-9-]+' "$gomod" \
      | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } > go.mod
  cat > tools.go <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
GO
  go mod tidy >&2
  pkg=k8s.io/component-base/version
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor" \
    -o "$bin/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >&2
fi

if [[ ! -x "$bin/etcd" ]]; then
  log "building etcd $ETCD_VERSION"
  # `go install pkg@version` refuses modules whose go.mod has replace directives (etcd's server module replaces
  # its sibling modules with local paths), so build it from a wrapper module that repeats those replaces
  # against the published sibling modules of the same release.
  work="$CQRS_CACHE/k8s-$K8S_VERSION/etcd-wrapper"; mkdir -p "$work"; cd "$work"
  etcd_gomod="$(go mod download -json "go.etcd.io/etcd/server/v3@$ETCD_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')"
  {
    echo "module cqrs.local/etcd-wrapper"
    echo "go 1.24"
    echo "require go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    grep -oE '^\s*go\.etcd\.io/etcd/[a-z0-9/-]+ => \.\./[a-z0-9/-]+' "$etcd_gomod" \
      | awk -v v="$ETCD_VERSION" '{print "replace " $1 " => " $1 " " v}'
  } > go.mod
  cat > tools.go <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  go mod tidy >&2
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3 >&2
fi
touch "$marker"; echo "$bin"
