#!/usr/bin/env bash
# Day-2 operations on the running CqrsStack, each under a read/write load (`cqrs-e2e load`) that counts every
# failed request and ends with the exactly-once checks (PostgreSQL, Kafka order, read model). Sourced by e2e.sh,
# which has set KUBECONFIG, STACK_NS, STACK, TAG, the database URLs and the gateway URL.
# shellcheck disable=SC2154
LOAD_RATE="${E2E_LOAD_RATE:-30}"
REPORTS="$OUT/day2"
mkdir -p "$REPORTS"
# load_start NAME: a load in the background, returned once it is flowing (its ready file exists).
load_start() {
  local name=$1
  rm -f "$REPORTS/$name".{stop,ready,json}
  "$DEBUG_BIN/cqrs-e2e" load --name "$name" --rate "$LOAD_RATE" --reads-per-write 2 \
    --stop-file "$REPORTS/$name.stop" --ready-file "$REPORTS/$name.ready" --out "$REPORTS/$name.json" \
    --pg-url "$STACK_PG_URL" --kafka-bootstrap "$KAFKA_BOOTSTRAP" --topic-prefix "$TOPIC_PREFIX" \
    > "$REPORTS/$name.log" 2>&1 &
  LOAD_PID[$name]=$!
  local deadline=$((SECONDS + 120))
  until [[ -f "$REPORTS/$name.ready" ]]; do
    kill -0 "${LOAD_PID[$name]}" 2>/dev/null || { tail -20 "$REPORTS/$name.log" >&2; die "load $name exited before it was ready"; }
    ((SECONDS < deadline)) || die "load $name: no acknowledged writes within 120 s"
    sleep 0.2
  done
}

# load_stop NAME DETAIL [inflight]: stops the load, waits for its checks, and records the day-2 check as passed
# or failed. With `inflight`, requests that failed while a process was killed under them (no answer can come
# from a SIGKILLed process) are reported but do not fail the check; lost, duplicated or reordered data does.
load_stop() {
  local name=$1 detail=${2:-} inflight=${3:-} rc=0
  touch "$REPORTS/$name.stop"
  wait "${LOAD_PID[$name]}" || rc=$?
  if [[ -n "$inflight" && $rc -eq 1 ]]; then
    rc=$(python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
k = r.get("kafka") or {}
clean = r.get("lost") == 0 and r.get("duplicated") == 0 and k.get("out_of_order", 0) == 0 and not r.get("check_error")
print(0 if clean else 1)' "$REPORTS/$name.json" 2>/dev/null || echo 1)
  fi
  local line
  line="$(grep -E "^load $name: [0-9]+/[0-9]+ writes" "$REPORTS/$name.log" | tail -1)"
  [[ -n "$line" ]] || line="load $name: no report (exit $rc); $(tail -3 "$REPORTS/$name.log" | tr '\n' ' ')"
  record "$name" "$rc" "$line${detail:+; $detail}"
}

pod_ips() { # component
  kc -n "$STACK_NS" get pods -l "app.kubernetes.io/instance=$STACK,app.kubernetes.io/component=$1" \
    --field-selector=status.phase=Running -o jsonpath='{range .items[*]}{.status.podIP}{"\n"}{end}'
}
metric_sum() { # url metric
  curl -fsS "$1" | awk -v m="$2" '$1 ~ "^"m"({|$)" {s += $NF} END {printf "%d\n", s}'
}

# --- 1. scale query 2 -> 3 under load: the new replica gets partitions (it applies events), no failed request.
phase "day2: scale query 2->3"
load_start scale-query
kc -n "$STACK_NS" patch cqrsstack "$STACK" --type merge -p '{"spec":{"query":{"replicas":3}}}' >/dev/null
kc -n "$STACK_NS" rollout status "deploy/$STACK-query" --timeout "$WAIT" >&2
kc -n "$STACK_NS" wait "cqrsstack/$STACK" --for=jsonpath='{.status.replicas.query}'=3/3 --timeout "$WAIT" >&2
mapfile -t ips < <(pod_ips query)
declare -A applied_before
for ip in "${ips[@]}"; do applied_before[$ip]="$(metric_sum "http://$ip:3125/metrics" cqrs_query_events_applied_total)"; done
# Each replica must apply events of its own partitions while the load runs (bounded wait on that condition).
deadline=$((SECONDS + 90)); idle=("${ips[@]}")
while ((${#idle[@]})) && ((SECONDS < deadline)); do
  still=()
  for ip in "${idle[@]}"; do
    now="$(metric_sum "http://$ip:3125/metrics" cqrs_query_events_applied_total)"
    ((now > ${applied_before[$ip]})) || still+=("$ip")
  done
  idle=("${still[@]}")
  ((${#idle[@]})) && sleep 1
done
load_stop scale-query "${#ips[@]} query replicas, $(( ${#ips[@]} - ${#idle[@]} )) applying events after the rebalance"
((${#idle[@]} == 0)) || record scale-query-rebalance 1 "replicas that applied nothing after the rebalance: ${idle[*]}"

# --- 2. bump projections.generation under load: built blue/green, then serves; reads never fail.
phase "day2: projection rebuild"
load_start rebuild
t=$SECONDS
kc -n "$STACK_NS" patch cqrsstack "$STACK" --type merge -p '{"spec":{"projections":{"generation":2}}}' >/dev/null
kc -n "$STACK_NS" wait "cqrsstack/$STACK" --for=jsonpath='{.status.projections.serving}'=2 --timeout "$WAIT" >&2
load_stop rebuild "generation 2 serving after $((SECONDS - t)) s"

# --- 3. kill -9 the mutation replica holding the relay lock: the other takes over; exactly once.
phase "day2: kill the relay leader"
load_start relay-kill
leader_ip="" other_ip=""
for ip in $(pod_ips mutation); do
  if curl -fsS "http://$ip:3124/relay/status" | grep -q '"leader":true'; then leader_ip=$ip; else other_ip=$ip; fi
done
[[ -n "$leader_ip" && -n "$other_ip" ]] || die "relay leader not found among the mutation pods"
leader_pod="$(kc -n "$STACK_NS" get pods -o jsonpath="{.items[?(@.status.podIP==\"$leader_ip\")].metadata.name}")"
cid="$(kc -n "$STACK_NS" get pod "$leader_pod" -o jsonpath='{.status.containerStatuses[0].containerID}')"
pid="$(ctr_ tasks ls | awk -v id="${cid#containerd://}" '$1 == id {print $2}')"
[[ -n "$pid" ]] || die "no task for the relay leader's container $cid"
t_kill=$(date +%s.%N)
kill -9 "$pid"
deadline=$((SECONDS + 120))
until curl -fsS "http://$other_ip:3124/relay/status" 2>/dev/null | grep -q '"leader":true'; do
  ((SECONDS < deadline)) || die "no mutation replica took the relay lock within 120 s of the leader's kill"
  sleep 0.1
done
takeover="$(echo "$(date +%s.%N) - $t_kill" | bc)"
kc -n "$STACK_NS" wait "pod/$leader_pod" --for=condition=Ready --timeout "$WAIT" >/dev/null
load_stop relay-kill "kill -9 of $leader_pod (pid $pid); the other replica led after $(printf '%.2f' "$takeover") s" inflight

# --- 4. delete the operator pod during a rebuild: the new operator resumes it.
phase "day2: operator restart during a rebuild"
kc -n "$STACK_NS" patch cqrsstack "$STACK" --type merge -p '{"spec":{"projections":{"generation":3}}}' >/dev/null
kc -n "$STACK_NS" wait "cqrsstack/$STACK" --for=jsonpath='{.status.projections.target}'=3 --timeout "$WAIT" >&2
kc -n "$OPERATOR_NS" delete pod -l app.kubernetes.io/name=cqrs-operator --wait=false >/dev/null
kc -n "$OPERATOR_NS" rollout status deploy/cqrs-operator --timeout "$WAIT" >&2
if kc -n "$STACK_NS" wait "cqrsstack/$STACK" --for=jsonpath='{.status.projections.serving}'=3 --timeout "$WAIT" >&2; then
  record operator-restart 0 "the new operator finished the rebuild: generation 3 serving"
else
  record operator-restart 1 "generation 3 never served after the operator pod was deleted"
fi

# --- 5. rolling update of the service images under load: zero failed requests.
phase "day2: rolling update"
NEW_TAG="$TAG-r2"
for b in gateway mutation query; do ctr_ images tag --force "docker.io/cqrs/$b:$TAG" "docker.io/cqrs/$b:$NEW_TAG" >/dev/null; done
load_start rolling-update
kc -n "$STACK_NS" patch cqrsstack "$STACK" --type merge -p "{\"spec\":{\"images\":{
  \"gateway\":\"cqrs/gateway:$NEW_TAG\",\"mutation\":\"cqrs/mutation:$NEW_TAG\",\"query\":\"cqrs/query:$NEW_TAG\"}}}" >/dev/null
for c in gateway mutation query; do kc -n "$STACK_NS" rollout status "deploy/$STACK-$c" --timeout "$WAIT" >&2; done
wait_stack_ready
load_stop rolling-update "all pods on $NEW_TAG"

# --- Prometheus has scraped the pods through all of the above: the dashboards show data, no alert fires.
phase "day2: prometheus"
prometheus_check

# --- 6. helm upgrade of the operator; delete the CqrsStack (its finalizer cleans up); helm uninstall.
phase "day2: helm upgrade, delete, uninstall"
"$HELM" upgrade cqrs-operator "$ROOT/charts/cqrs-operator" --kubeconfig "$KUBECONFIG_ADMIN" --namespace "$OPERATOR_NS" \
  --reuse-values --set logLevel=debug --wait --timeout "$WAIT" >&2
kc -n "$OPERATOR_NS" rollout status deploy/cqrs-operator --timeout "$WAIT" >&2
if wait_stack_ready; then
  record helm-upgrade 0 "operator upgraded; the stack stayed Ready"
else
  record helm-upgrade 1 "the stack is not Ready after the operator's upgrade"
fi
kc -n "$STACK_NS" delete cqrsstack "$STACK" --wait=true --timeout "$WAIT" >&2
left="$(kc -n "$STACK_NS" get deploy,svc,cm,pdb -l "app.kubernetes.io/instance=$STACK" -o name 2>/dev/null | wc -l)"
record delete-stack "$((left > 0))" "CqrsStack deleted; $left owned objects left"
"$HELM" uninstall cqrs-operator --kubeconfig "$KUBECONFIG_ADMIN" --namespace "$OPERATOR_NS" --wait --timeout "$WAIT" >&2
left="$(kc -n "$OPERATOR_NS" get deploy,sa -l app.kubernetes.io/instance=cqrs-operator -o name 2>/dev/null | wc -l)"
record helm-uninstall "$((left > 0))" "operator uninstalled; $left of its objects left"

