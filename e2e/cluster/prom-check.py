"""Checks a Prometheus that scrapes the cluster's stack: every dashboard query of the chart parses, the key
panels (e2e/observability/key-panels.txt) return data, every alert rule of the chart is loaded and evaluates
healthily, and none is firing. `prom-check.py PROMETHEUS_URL CHART_DIR KEY_PANELS_FILE`. Retries the data and
rule checks for up to 90 s (scrapes and rule evaluations need a few intervals); prints what it found."""
import json
import pathlib
import sys
import time
import urllib.parse
import urllib.request

base, chart, keys_file = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]


def get(path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


queries = []
for f in sorted((chart / "dashboards").glob("*.json")):
    for panel in json.loads(f.read_text())["panels"]:
        for t in panel["targets"]:
            queries.append((f.name, panel["title"], t["expr"]))
keys = [l.strip() for l in open(keys_file) if l.strip() and not l.startswith("#")]
missing_keys = [k for k in keys if not any(t == k for _, t, _ in queries)]
if missing_keys:
    sys.exit(f"key panels not in the dashboards: {missing_keys}")
bad = [(f, t, e, r) for f, t, e in queries if (r := get("/api/v1/query", query=e))["status"] != "success"]
if bad:
    sys.exit(f"dashboard queries that do not evaluate: {bad}")
print(f"[prometheus] {len(queries)} dashboard queries evaluate")

deadline = time.monotonic() + 90
while True:
    empty = []
    for f, t, e in queries:
        if t not in keys:
            continue
        res = get("/api/v1/query", query=e)["data"]["result"]
        if not any(r.get("value", [0, "NaN"])[1] != "NaN" for r in res):
            empty.append(f"{t}: {e}")
    groups = get("/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    unhealthy = [r["name"] for r in rules if r.get("health") != "ok"]
    if not empty and rules and not unhealthy:
        break
    if time.monotonic() > deadline:
        sys.exit(f"key panels without data: {empty}; rules: {len(rules)}, unhealthy: {unhealthy}")
    time.sleep(2)
targets = get("/api/v1/targets")["data"]["activeTargets"]
up = sorted(t["labels"].get("job", "?") + "/" + t["labels"].get("pod", "?") for t in targets if t["health"] == "up")
print(f"[prometheus] {len(up)} targets up: {', '.join(up)}")
print(f"[prometheus] {len(keys)} key panels have data; {len(rules)} alert rules evaluate healthily")
firing = [r["name"] for r in rules if r.get("state") == "firing"]
if firing:
    sys.exit(f"alerts firing: {firing}")
print("[prometheus] no alert is firing")
