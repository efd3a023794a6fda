#!/usr/bin/env bash
# Makes sure Debian's PostgreSQL 15 server binaries exist (idempotent); prints the bin directory.
here="$(cd "$(dirname "$0")" && pwd)"; . "$here/common.sh"
find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
bin="$(find_bin)"
if [[ -z "$bin" || ! -x "$bin/initdb" ]]; then
  log "installing postgresql-15"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 postgresql-client-15 >&2
  bin="$(find_bin)"
fi
echo "$bin"
