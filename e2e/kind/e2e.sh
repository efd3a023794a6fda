#!/usr/bin/env bash
# End to end on kind: cluster, Strimzi, images, PostgreSQL/MongoDB, the operator chart, a CqrsStack, then the
# e2e suite against the gateway. Every wait is `kubectl wait` on a condition (or a rollout), never a sleep.
# KEEP_CLUSTER=1 leaves the cluster up afterwards; E2E_CMD overrides the suite's command.
# shellcheck source=e2e/kind/lib.sh
. "$(dirname "$0")/lib.sh"
require docker kind kubectl helm openssl curl cargo

PF_PID=""
teardown() {
  local rc=$?
  [[ -n "$PF_PID" ]] && kill "$PF_PID" 2>/dev/null || true
  if [[ "${KEEP_CLUSTER:-0}" == 1 ]]; then
    log "keeping cluster $CLUSTER (delete with e2e/kind/down.sh)"
  else
    log "deleting cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" || true
  fi
  exit "$rc"
}
trap teardown EXIT

build_image() { # <bin> <cargo package>
  log "building image cqrs/$1:$TAG"
  docker build --build-arg "BIN=$1" --build-arg "PACKAGE=$2" -t "cqrs/$1:$TAG" "$ROOT"
  kind load docker-image "cqrs/$1:$TAG" --name "$CLUSTER"
}

log "creating kind cluster $CLUSTER"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --config "$ROOT/kind-config.yaml" --wait 180s
fi

log "installing Strimzi $STRIMZI_VERSION"
helm upgrade --install strimzi oci://quay.io/strimzi-helm/strimzi-kafka-operator \
  --kube-context "kind-$CLUSTER" --version "$STRIMZI_VERSION" \
  --namespace "$KAFKA_NS" --create-namespace --set watchAnyNamespace=true --wait --timeout "$WAIT"

build_image gateway cqrs-gateway
build_image mutation cqrs-mutation
build_image query cqrs-query
build_image operator cqrs-operator

log "starting Kafka (KRaft, one node)"
kc apply -f "$ROOT/manifests/kind/kafka.yaml"

log "starting PostgreSQL and MongoDB"
kc create namespace "$STACK_NS" --dry-run=client -o yaml | kc apply -f -
pg_password="$(openssl rand -hex 16)"
jwt_secret="$(openssl rand -hex 32)"
kc -n "$STACK_NS" create secret generic postgres-credentials --from-literal=password="$pg_password" \
  --dry-run=client -o yaml | kc apply -f -
kc -n "$STACK_NS" create secret generic pg \
  --from-literal=url="postgres://cqrs:$pg_password@postgres.$STACK_NS.svc:5432/cqrs" \
  --dry-run=client -o yaml | kc apply -f -
kc -n "$STACK_NS" create secret generic mongo \
  --from-literal=url="mongodb://mongo-0.mongo.$STACK_NS.svc:27017/?replicaSet=rs0" \
  --dry-run=client -o yaml | kc apply -f -
kc -n "$STACK_NS" create secret generic auth --from-literal=AUTH_JWT_SECRET="$jwt_secret" \
  --dry-run=client -o yaml | kc apply -f -
kc apply -f "$ROOT/manifests/kind/postgres.yaml" -f "$ROOT/manifests/kind/mongodb.yaml"
kc -n "$STACK_NS" rollout status statefulset/postgres --timeout "$WAIT"
kc -n "$STACK_NS" rollout status statefulset/mongo --timeout "$WAIT"
kc -n "$STACK_NS" wait job/mongo-rs-init --for=condition=Complete --timeout "$WAIT"
kc -n "$KAFKA_NS" wait kafka/events --for=condition=Ready --timeout "$WAIT"

log "installing the operator chart"
helm upgrade --install cqrs-operator "$ROOT/charts/cqrs-operator" --kube-context "kind-$CLUSTER" \
  --namespace "$OPERATOR_NS" --create-namespace \
  --set image.repository=cqrs/operator --set image.tag="$TAG" --set image.pullPolicy=Never \
  --wait --timeout "$WAIT"

log "applying the sample CqrsStack"
kc apply -f "$ROOT/manifests/samples/cqrsstack.yaml"
kc -n "$STACK_NS" patch cqrsstack shop --type merge -p "{\"spec\":{\"images\":{
  \"gateway\":\"cqrs/gateway:$TAG\",\"mutation\":\"cqrs/mutation:$TAG\",\"query\":\"cqrs/query:$TAG\",
  \"pullPolicy\":\"Never\"}}}"
kc -n "$STACK_NS" wait cqrsstack/shop --for=condition=TopicsReady --timeout "$WAIT"
kc -n "$STACK_NS" wait cqrsstack/shop --for=condition=Ready --timeout "$WAIT"
kc -n "$STACK_NS" get cqrsstack shop

log "port-forwarding the gateway"
port="${GATEWAY_PORT:-13123}"
kc -n "$STACK_NS" port-forward svc/shop-gateway "$port:3123" >/dev/null &
PF_PID=$!
curl -fsS --retry 30 --retry-delay 1 --retry-all-errors "http://127.0.0.1:$port/healthz" >/dev/null

log "running the e2e suite against the gateway"
# cqrs-e2e reads its target from CQRS_GATEWAY_URL and the gateway's HS256 secret from AUTH_JWT_SECRET.
export CQRS_GATEWAY_URL="http://127.0.0.1:$port"
export AUTH_JWT_SECRET="$jwt_secret"
if [[ -n "${E2E_CMD:-}" ]]; then
  bash -c "$E2E_CMD"
else
  (cd "$ROOT" && cargo build --release -p cqrs-e2e --bin cqrs-e2e)
  e2e_bin="${CARGO_TARGET_DIR:-$ROOT/target}/release/cqrs-e2e"
  "$e2e_bin" scenario seed
  "$e2e_bin" hostile
fi

log "projection rebuild: bump the generation and wait until it serves"
kc -n "$STACK_NS" patch cqrsstack shop --type merge -p '{"spec":{"projections":{"generation":2}}}'
kc -n "$STACK_NS" wait cqrsstack/shop --for=jsonpath='{.status.projections.serving}'=2 --timeout "$WAIT"
kc -n "$STACK_NS" get cqrsstack shop
log "e2e passed"
