#!/usr/bin/env bash
# Builds FerretDB (the alternative Mongo-wire server) from Go modules into the cache (idempotent; prints the
# binary). FerretDB's own cmd/ferretdb panics at start when built with `go install` (a generated version file is
# missing from the module), so we build the small wrapper module next to these scripts, which embeds FerretDB
# through its public package (telemetry off, no state file). The wrapper's go.sum pins every dependency.
here="$(cd "$(dirname "$0")" && pwd)"; . "$here/common.sh"
src="$(cd "$here/../ferretdb-wrapper" && pwd)"
grep -q "github.com/FerretDB/FerretDB v$FERRETDB_VERSION\$" "$src/go.mod" || {
  log "ferretdb-wrapper/go.mod does not require FerretDB v$FERRETDB_VERSION (FERRETDB_VERSION in common.sh)"; exit 1; }
# The binary is keyed by the wrapper's sources too, so an edit to main.go or go.sum rebuilds it.
key="$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-12)"
dir="$CQRS_CACHE/ferretdb-v$FERRETDB_VERSION"
bin="$dir/bin-$key/ferretdb"
marker="$(done_marker "ferretdb-v$FERRETDB_VERSION-$key")"
if [[ -f "$marker" && -x "$bin" ]]; then echo "$bin"; exit 0; fi
command -v go >/dev/null || { log "installing golang"; apt-get update -qq && apt-get install -y -qq golang-go; }
mkdir -p "$(dirname "$bin")"
# One build at a time: parallel test binaries would otherwise each compile it on a cold cache.
exec 9>"$dir/.build.lock"; flock 9
if [[ ! -f "$marker" || ! -x "$bin" ]]; then
  log "building FerretDB v$FERRETDB_VERSION (cold: about a minute)"
  tmp="$bin.tmp.$$"
  (cd "$src" && CGO_ENABLED=0 go build -mod=readonly -buildvcs=false -trimpath -ldflags "-s -w" -o "$tmp" .) >&2
  mv -f "$tmp" "$bin"
  touch "$marker"
  # Builds of earlier wrapper sources are dead weight now (a server still running one keeps its inode).
  for old in "$dir"/bin-* "$CQRS_CACHE"/.done-ferretdb-*; do
    [[ "$old" == "$(dirname "$bin")" || "$old" == "$marker" ]] || rm -rf "$old"
  done
fi
echo "$bin"
