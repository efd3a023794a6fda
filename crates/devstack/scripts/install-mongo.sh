#!/usr/bin/env bash
# Installs the MongoDB-wire stand-in (PyPI SecantusDB) into a venv in the cache (idempotent).
here="$(cd "$(dirname "$0")" && pwd)"; . "$here/common.sh"
venv="$CQRS_CACHE/venv-secantus-$SECANTUS_VERSION"
marker="$(done_marker secantus-$SECANTUS_VERSION)"
if [[ -f "$marker" ]]; then echo "$venv/bin/secantusd-py"; exit 0; fi
log "installing SecantusDB $SECANTUS_VERSION into $venv"
rm -rf "$venv"; python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check --pre "SecantusDB==$SECANTUS_VERSION" >&2
touch "$marker"; echo "$venv/bin/secantusd-py"
