#!/usr/bin/env bash
# Deletes the kind cluster of the e2e recipe.
# shellcheck source=e2e/kind/lib.sh
. "$(dirname "$0")/lib.sh"
require kind
kind delete cluster --name "$CLUSTER"
