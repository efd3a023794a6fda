#!/usr/bin/env bash
# `just cluster-down`: removes everything `just cluster-up` created, and says what it removed: the processes (by
# recorded PID), containerd's tasks and containers and their shims, mounts, network namespaces, iptables chains,
# the bridge, CNI state, cgroups, and the kernel settings it changed. The built binaries and images stay cached.
# shellcheck source=e2e/cluster/lib.sh
. "$(dirname "$0")/lib.sh"
set +e
[[ $(id -u) -eq 0 ]] || die "the local cluster needs root"
removed=()
said() { removed+=("$*"); printf '[cluster down] %s\n' "$*" >&2; }

stop() { # name...: SIGTERM, then SIGKILL after 10 s
  local name pid i
  for name in "$@"; do
    [[ -f "$PIDS/$name" ]] || continue
    pid="$(cat "$PIDS/$name")"
    if kill "$pid" 2>/dev/null; then
      for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null
      said "stopped $name (pid $pid)"
    fi
    rm -f "$PIDS/$name"
  done
}

stop prometheus prometheus-sd kube-proxy kubelet kube-controller-manager kube-scheduler
if [[ -S "$SOCK" ]] && ctr --address "$SOCK" version >/dev/null 2>&1; then
  tasks=$(ctr_ tasks ls -q 2>/dev/null)
  for id in $tasks; do ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1; done
  for id in $tasks; do
    for ((i = 0; i < 50; i++)); do ctr_ tasks delete -f "$id" >/dev/null 2>&1 && break; sleep 0.1; done
  done
  containers=$(ctr_ containers ls -q 2>/dev/null)
  for id in $containers; do ctr_ containers delete "$id" >/dev/null 2>&1; done
  [[ -n "$tasks$containers" ]] && said "deleted $(wc -w <<< "$containers") containerd containers ($(wc -w <<< "$tasks") tasks)"
fi
# Shims of this containerd (their command line names its socket).
for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $SOCK" 2>/dev/null); do
  kill -9 "$pid" 2>/dev/null && said "stopped shim (pid $pid)"
done
stop containerd kube-apiserver etcd

# Mounts under the cluster's directory and the pods' network namespaces, deepest first.
n=0
while read -r m; do
  umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
  n=$((n + 1))
done < <(findmnt -rn -o TARGET | grep -E "^$CLUSTER_DIR/|^/run/netns/cni-|^/var/run/netns/cni-" | sort -r)
((n)) && said "unmounted $n mounts"
n=0
for f in /run/netns/cni-*; do [[ -e "$f" ]] && rm -f "$f" && n=$((n + 1)); done
((n)) && said "removed $n network namespaces"

# iptables: kube-proxy's chains (KUBE-*), the CNI plugins' (CNI-*), and the egress guard (CQRS-EGRESS).
n=0
for table in nat filter mangle; do
  rules=$(iptables -t "$table" -S 2>/dev/null | grep -E '^-A .*(KUBE-|CNI-|CQRS-EGRESS)')
  while read -r rule; do
    [[ -n "$rule" ]] || continue
    # iptables-save quoting (comments with spaces) is shell quoting, so eval reads it back whole.
    eval "iptables -t $table ${rule/#-A/-D}" 2>/dev/null && n=$((n + 1))
  done <<< "$rules"
  chains=$(iptables -t "$table" -S 2>/dev/null | awk '/^-N (KUBE-|CNI-|CQRS-EGRESS)/ {print $2}')
  for c in $chains; do iptables -t "$table" -F "$c" 2>/dev/null; done
  for c in $chains; do iptables -t "$table" -X "$c" 2>/dev/null && n=$((n + 1)); done
done
((n)) && said "removed $n iptables rules and chains"
conntrack -D -s "$POD_CIDR" >/dev/null 2>&1

if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE" && said "deleted bridge $BRIDGE"; fi
for d in "/var/lib/cni/networks/$CNI_NETWORK" /var/lib/cni/results; do
  if [[ -d "$d" ]] && [[ -n "$(ls -A "$d" 2>/dev/null)" ]]; then
    if [[ $d == */results ]]; then
      rm -f "$d/$CNI_NETWORK"-* && said "removed CNI results of $CNI_NETWORK"
    else
      rm -rf "$d" && said "removed CNI address state $d"
    fi
  fi
done

# cgroups the kubelet and runc made (every v1 hierarchy and the unified one), leaves first.
n=0
for root in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
  for top in kubepods kubepods.slice k8s.io; do
    [[ -d "$root$top" ]] || continue
    while read -r d; do rmdir "$d" 2>/dev/null && n=$((n + 1)); done < <(find "$root$top" -depth -type d)
  done
done
((n)) && said "removed $n cgroups"

if [[ -f "$CLUSTER_DIR/sysctl.saved" ]]; then
  while IFS= read -r line; do sysctl -qw "$line" 2>/dev/null; done < "$CLUSTER_DIR/sysctl.saved"
  said "restored $(paste -sd' ' "$CLUSTER_DIR/sysctl.saved")"
fi
if [[ -d "$CLUSTER_DIR" ]]; then
  if findmnt -rn -o TARGET | grep -q "^$CLUSTER_DIR/"; then
    die "mounts remain under $CLUSTER_DIR; not deleting it"
  fi
  rm -rf "$CLUSTER_DIR" && said "deleted $CLUSTER_DIR"
fi
left_rules=$(iptables-save 2>/dev/null | grep -cE 'KUBE-|CNI-|CQRS-EGRESS')
left_mounts=$(findmnt -rn -o TARGET | grep -cE "^$CLUSTER_DIR|netns/cni-")
printf '[cluster down] %s; left: %s iptables lines, %s mounts\n' \
  "$(if ((${#removed[@]})); then echo "removed ${#removed[@]} kinds of things"; else echo "nothing was running"; fi)" \
  "$left_rules" "$left_mounts" >&2
((left_rules == 0 && left_mounts == 0))
