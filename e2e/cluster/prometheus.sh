#!/usr/bin/env bash
# Debian's Prometheus on the host, scraping the cluster's pods: every pod of the stack (port `http`) and the
# operator (port `http-metrics`), with the chart's alert rules loaded. Debian builds Prometheus without Kubernetes
# service discovery, so a loop writes the pods as file_sd targets every two seconds (pod-targets.py). Sourced by e2e.sh: `prometheus_start` after the stack is up, `prometheus_check`
# after the day-2 load. Listens on 127.0.0.1 only.
# shellcheck disable=SC2154
PROM_DIR="$CLUSTER_DIR/prometheus"
PROM_PORT="${PROM_PORT:-29090}"
PROM_URL="http://127.0.0.1:$PROM_PORT"

prometheus_start() {
  command -v prometheus >/dev/null || {
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >&2
  }
  local n
  for n in prometheus prometheus-sd; do # a kept cluster's previous run
    if pid_alive "$n"; then kill "$(cat "$PIDS/$n")"; fi
  done
  wait_for "the previous Prometheus to stop" 30 bash -c "! curl -fsS $PROM_URL/-/ready"
  rm -rf "$PROM_DIR" && mkdir -p "$PROM_DIR"
  cat > "$PROM_DIR/prometheus.yml" <<YAML
global: {scrape_interval: 2s, evaluation_interval: 2s}
rule_files: ["$ROOT/charts/cqrs-operator/rules/alerts.yaml"]
scrape_configs:
  - job_name: cqrs-stack
    file_sd_configs: [{files: ["$PROM_DIR/targets.json"], refresh_interval: 2s}]
YAML
  echo '[]' > "$PROM_DIR/targets.json"
  setsid python3 "$ROOT/e2e/cluster/pod-targets.py" "$K8S_BIN/kubectl" "$KUBECONFIG_ADMIN" "$PROM_DIR/targets.json" \
    > "$LOGS/prometheus-sd.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/prometheus-sd"
  # A process of its own (setsid) whose PID `down` finds; it dies with the cluster's directory at the latest.
  setsid prometheus --config.file="$PROM_DIR/prometheus.yml" --storage.tsdb.path="$PROM_DIR/data" \
    --web.listen-address="127.0.0.1:$PROM_PORT" > "$LOGS/prometheus.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/prometheus"
  wait_for "Prometheus" 60 curl -fsS "$PROM_URL/-/ready"
  log "Prometheus scraping the cluster's pods at $PROM_URL"
}

prometheus_check() {
  local rc=0 out
  out="$(python3 "$ROOT/e2e/cluster/prom-check.py" "$PROM_URL" "$ROOT/charts/cqrs-operator" \
    "$ROOT/e2e/observability/key-panels.txt" 2>&1)" || rc=$?
  printf '%s\n' "$out" >&2
  record prometheus "$rc" "$(tail -1 <<< "$out")"
}
