#!/usr/bin/env bash
# `just e2e` without Docker: the Kubernetes path end to end on the local single-node cluster (e2e/cluster/up.sh).
#   1. the operator chart, installed with helm --wait (CRDs from the chart's crds/);
#   2. PostgreSQL, Kafka 4.3.1 (KRaft) and the Mongo-wire server on the host, at the node's address, as a
#      platform team's managed databases would be (devstack profile `cluster`);
#   3. a CqrsStack with 2 replicas each of gateway, mutation and query, topicMode direct, until Ready;
#   4. the seed scenario and the hostile suite through the gateway's Service;
#   5. day-2 operations under load (e2e/cluster/day2.sh);
#   6. Debian's Prometheus scraping the pods during the load: dashboard queries return data, no alert fires
#      (e2e/cluster/prometheus.sh).
# Every wait is on a condition (kubectl wait / rollout status), never a fixed sleep. KEEP_CLUSTER=1 keeps the
# cluster and the stack afterwards; E2E_SEED_N sets the seed's size (default 5000 of each).
# shellcheck source=e2e/cluster/lib.sh
. "$(dirname "$0")/lib.sh"
[[ $(id -u) -eq 0 ]] || die "the local cluster needs root"
STACK_NS=cqrs
OPERATOR_NS=cqrs-system
STACK=shop
WAIT="${WAIT_TIMEOUT:-300s}"
SEED_N="${E2E_SEED_N:-5000}"
OUT="${CQRS_E2E_OUT:-$ROOT/e2e/out/cluster}"
mkdir -p "$OUT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
DEBUG_BIN="$CARGO_TARGET_DIR/debug"
phase_start=$SECONDS
phases=()
checks_passed=0
checks_failed=0
# Background loads of the day-2 checks (day2.sh), stopped with the run whatever happens.
declare -A LOAD_PID=()
results=()
# record NAME STATUS TEXT: one check of this run, passed (STATUS 0) or failed; counted in the closing line.
record() {
  if (($2 == 0)); then
    checks_passed=$((checks_passed + 1)); results+=("PASS $1: $3")
  else
    checks_failed=$((checks_failed + 1)); results+=("FAIL $1: $3")
  fi
  log "${results[-1]}"
}
phase() { # name: closes the previous phase's timer and opens this one
  local now=$SECONDS
  ((${#phases[@]})) && phases[-1]="${phases[-1]} $((now - phase_start))s"
  phases+=("$1")
  phase_start=$now
  log "== $1"
}
finish() {
  local rc=$? p
  for p in "${LOAD_PID[@]}"; do kill "$p" 2>/dev/null || true; done
  ((${#phases[@]})) && phases[-1]="${phases[-1]} $((SECONDS - phase_start))s"
  printf '[cluster e2e] phases: %s\n' "$(IFS=','; echo "${phases[*]}")" >&2
  ((${#results[@]})) && printf '%s\n' "${results[@]}" > "$OUT/summary.txt" && printf '[cluster e2e] %s\n' "${results[@]}" >&2
  ((rc != 0 && checks_failed == 0)) && checks_failed=1
  echo "cluster e2e: ${checks_passed} passed, ${checks_failed} failed"
  if ((rc != 0)); then
    log "FAILED (exit $rc); the operator's and the stack's last log lines:"
    kc -n "$OPERATOR_NS" logs deploy/cqrs-operator --tail=30 2>/dev/null | cut -c1-400 >&2 || true
    kc -n "$STACK_NS" get pods -o wide >&2 2>/dev/null || true
    kc -n "$STACK_NS" get events --sort-by=.lastTimestamp 2>/dev/null | tail -20 >&2 || true
  fi
  if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then
    "$DEBUG_BIN/devstack" stop --profile cluster >/dev/null 2>&1 || true
    bash "$ROOT/e2e/cluster/down.sh" >/dev/null 2>&1 || true
  else
    log "keeping the cluster (KUBECONFIG=$KUBECONFIG_ADMIN; remove with just cluster-down)"
  fi
  exit "$rc"
}
trap finish EXIT

phase cluster
eval "$(bash "$ROOT/e2e/cluster/up.sh")"
K8S_BIN="$(k8s_bin)"; export K8S_BIN # used by kc (lib.sh) and prometheus.sh
NODE_IP="$(node_ip)"

phase images
(cd "$ROOT" && cargo build -p cqrs-devstack --bin devstack -p cqrs-e2e --bin cqrs-e2e) >&2
TAG="$(bash "$ROOT/e2e/cluster/images.sh")"
read -r TOOLS _ < <(bash "$ROOT/operator/scripts/install-tools.sh")
HELM="$TOOLS/helm"

phase databases
env_lines="$("$DEBUG_BIN/devstack" start --profile cluster --host "$NODE_IP" --clients "$POD_CIDR")"
PG_URL="$(sed -n 's/^CQRS_PG_URL=//p' <<< "$env_lines")"
KAFKA_BOOTSTRAP="$(sed -n 's/^CQRS_KAFKA_BOOTSTRAP=//p' <<< "$env_lines")"
MONGO_URL="$(sed -n 's/^CQRS_MONGO_URL=//p' <<< "$env_lines")"
PSQL="$(ls /usr/lib/postgresql/*/bin/psql | tail -1)"
# Each run gets its own database, Mongo database and topic prefix: a kept cluster's servers hold earlier runs'
# events and read models (whose generations would be "newer than the spec" for this run's stack).
RUN_ID="r$(date +%s)"
STACK_DB="${STACK}_$RUN_ID"
TOPIC_PREFIX="$STACK-$RUN_ID"
"$PSQL" -q "$PG_URL" -c "create database $STACK_DB"
STACK_PG_URL="${PG_URL%/*}/$STACK_DB"

phase operator
"$HELM" upgrade --install cqrs-operator "$ROOT/charts/cqrs-operator" --kubeconfig "$KUBECONFIG_ADMIN" \
  --namespace "$OPERATOR_NS" --create-namespace \
  --set image.repository=cqrs/operator --set image.tag="$TAG" --set image.pullPolicy=Never \
  --set watchKafkaTopics=false --set "networkPolicy.apiServerPorts={443,$APISERVER_PORT}" \
  --wait --timeout "$WAIT" >&2
kc -n "$OPERATOR_NS" rollout status deploy/cqrs-operator --timeout "$WAIT" >&2

phase stack
kc create namespace "$STACK_NS" --dry-run=client -o yaml | kc apply -f - >/dev/null
# A stack left by an interrupted run (KEEP_CLUSTER=1) goes first, so this run starts from nothing.
kc -n "$STACK_NS" delete cqrsstack --all --wait=true --timeout "$WAIT" >/dev/null
# The gateway reads its secret at start: keep the one a running stack already has (a new one would need a restart).
JWT_SECRET="$(kc -n "$STACK_NS" get secret auth -o jsonpath='{.data.AUTH_JWT_SECRET}' 2>/dev/null | base64 -d || true)"
[[ -n "$JWT_SECRET" ]] || JWT_SECRET="$(openssl rand -hex 32)"
kc -n "$STACK_NS" create secret generic pg --from-literal=url="$STACK_PG_URL" --dry-run=client -o yaml | kc apply -f - >/dev/null
kc -n "$STACK_NS" create secret generic mongo --from-literal=url="$MONGO_URL" --dry-run=client -o yaml | kc apply -f - >/dev/null
kc -n "$STACK_NS" create secret generic auth --from-literal=AUTH_JWT_SECRET="$JWT_SECRET" --dry-run=client -o yaml \
  | kc apply -f - >/dev/null
# wait_stack_ready: the operator has seen the current spec (observedGeneration), and the stack is Ready for it.
wait_stack_ready() {
  local gen
  gen="$(kc -n "$STACK_NS" get cqrsstack "$STACK" -o jsonpath='{.metadata.generation}')"
  kc -n "$STACK_NS" wait "cqrsstack/$STACK" --for=jsonpath='{.status.observedGeneration}'="$gen" --timeout "$WAIT" >/dev/null
  kc -n "$STACK_NS" wait "cqrsstack/$STACK" --for=condition=Ready --timeout "$WAIT" >/dev/null
}
stack_manifest() { # image tag
  cat <<YAML
apiVersion: cqrs.dev/v1alpha1
kind: CqrsStack
metadata: {name: $STACK, namespace: $STACK_NS}
spec:
  images: {gateway: "cqrs/gateway:$1", mutation: "cqrs/mutation:$1", query: "cqrs/query:$1", pullPolicy: Never}
  gateway: {replicas: 2, resources: {requests: {cpu: 50m, memory: 64Mi}, limits: {memory: 256Mi}}}
  mutation: {replicas: 2, resources: {requests: {cpu: 100m, memory: 128Mi}, limits: {memory: 512Mi}}}
  query: {replicas: 2, resources: {requests: {cpu: 100m, memory: 128Mi}, limits: {memory: 512Mi}}}
  postgres: {secretName: pg, key: url}
  mongo: {secretName: mongo, key: url, database: $STACK_DB}
  auth: {secretName: auth}
  kafka:
    bootstrapServers: "$KAFKA_BOOTSTRAP"
    topicMode: direct
    topicPrefix: $TOPIC_PREFIX
    partitions: 6
    replicas: 1
    deletionPolicy: Delete
  projections: {generation: 1}
YAML
}
stack_manifest "$TAG" | kc apply -f - >/dev/null
wait_stack_ready

kc -n "$STACK_NS" get cqrsstack "$STACK" >&2
# Every printer column holds a true value: read each column's own field, so an empty one cannot hide.
kc -n "$STACK_NS" wait "cqrsstack/$STACK" --for=jsonpath='{.status.projections.lag}' --timeout "$WAIT" >/dev/null
row="$(kc -n "$STACK_NS" get cqrsstack "$STACK" --no-headers)"
cols="$(kc -n "$STACK_NS" get cqrsstack "$STACK" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status} {.status.replicas.gateway} {.status.replicas.mutation} {.status.replicas.query} {.status.projections.lag} {.status.projections.serving}')"
read -r ready gw mut q lag serving _ <<< "$cols"
[[ $ready == True && $gw == 2/2 && $mut == 2/2 && $q == 2/2 && $lag =~ ^[0-9]+$ && $serving =~ ^[0-9]+$ ]] \
  || die "unexpected CqrsStack status (Ready gateway mutation query lag serving): $cols"
record stack-ready 0 "CqrsStack Ready, every printer column filled: $row"

# shellcheck source=e2e/cluster/prometheus.sh
. "$ROOT/e2e/cluster/prometheus.sh"
prometheus_start

GATEWAY_URL="http://$(kc -n "$STACK_NS" get svc "$STACK-gateway" -o jsonpath='{.spec.clusterIP}'):3123"
export CQRS_GATEWAY_URL="$GATEWAY_URL" AUTH_JWT_SECRET="$JWT_SECRET" CQRS_E2E_OUT="$OUT"
log "gateway Service at $GATEWAY_URL"

phase seed
rc=0; "$DEBUG_BIN/cqrs-e2e" scenario seed --users "$SEED_N" --products "$SEED_N" --orders "$SEED_N" \
  > "$OUT/seed.log" 2>&1 || rc=$?
tail -15 "$OUT/seed.log" >&2
record seed "$rc" "$(grep -m1 -E 'verified|passed' "$OUT/seed.log" | head -c 300)"
phase hostile
rc=0; "$DEBUG_BIN/cqrs-e2e" hostile > "$OUT/hostile.log" 2>&1 || rc=$?
tail -5 "$OUT/hostile.log" >&2
record hostile "$rc" "$(tail -3 "$OUT/hostile.log" | tr '\n' ' ' | head -c 300)"

if [[ "${E2E_SKIP_DAY2:-0}" != 1 ]]; then
  # shellcheck source=e2e/cluster/day2.sh
  . "$ROOT/e2e/cluster/day2.sh"
else
  phase prometheus
  prometheus_check
fi
((checks_failed == 0)) || die "cluster e2e: $checks_failed checks failed"
log "cluster e2e passed"
