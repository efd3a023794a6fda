#!/usr/bin/env bash
# `just cluster-up`: a single-node Kubernetes cluster on this machine, without Docker or kind. Idempotent: a
# running cluster is reused. Prints `export KUBECONFIG=…` for the caller. `just cluster-down` removes it.
# shellcheck source=e2e/cluster/lib.sh
. "$(dirname "$0")/lib.sh"
[[ $(id -u) -eq 0 ]] || die "the local cluster needs root (network namespaces, iptables, mounts, cgroups)"
ensure_packages
K8S_BIN="$(k8s_bin)"
NODE_IP="$(node_ip)"
[[ -n "$NODE_IP" ]] || die "no IPv4 address found for the node (set CQRS_NODE_IP)"
COMPONENTS=(etcd kube-apiserver containerd kube-controller-manager kube-scheduler kubelet kube-proxy)

running() {
  local c
  for c in "${COMPONENTS[@]}"; do pid_alive "$c" || return 1; done
  kc get --raw /readyz >/dev/null 2>&1
}
if running && kc wait --for=condition=Ready "node/$NODE_NAME" --timeout=30s >/dev/null 2>&1; then
  log "reusing the running cluster (node $NODE_NAME at $NODE_IP)"
  echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
  exit 0
fi
if [[ -d "$CLUSTER_DIR" ]]; then
  log "a previous cluster is partly there: removing it first"
  bash "$(dirname "$0")/down.sh" >&2
fi
t0=$SECONDS
mkdir -p "$PKI" "$CONF" "$LOGS" "$PIDS" "$CLUSTER_DIR"/{etcd,kubelet,podlogs,containerd,cni/net.d} "$IMAGE_DIR"

# --- PKI: one CA, a serving certificate for the API server and the kubelet, a client certificate each. -------
gen_cert() { # name subject [sans] [usage]
  local name=$1 subject=$2 sans=${3:-} usage=${4:-clientAuth} ext
  ext="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=$usage"
  [[ -n "$sans" ]] && ext="$ext
subjectAltName=$sans"
  openssl req -newkey rsa:2048 -nodes -keyout "$PKI/$name.key" -out "$PKI/$name.csr" -subj "$subject" 2>/dev/null
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -out "$PKI/$name.crt" -days 30 -extfile <(printf '%s\n' "$ext") 2>/dev/null
  rm -f "$PKI/$name.csr"
}
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -days 30 \
  -subj "/CN=cqrs-local-cluster-ca" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
gen_cert apiserver "/CN=kube-apiserver" \
  "IP:127.0.0.1,IP:$NODE_IP,IP:$KUBERNETES_SERVICE_IP,DNS:localhost,DNS:$NODE_NAME,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$CLUSTER_DOMAIN" \
  serverAuth
gen_cert kubelet-serving "/CN=$NODE_NAME" "IP:127.0.0.1,IP:$NODE_IP,DNS:$NODE_NAME" serverAuth
gen_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
gen_cert admin "/O=system:masters/CN=cluster-admin"
gen_cert kube-controller-manager "/CN=system:kube-controller-manager"
gen_cert kube-scheduler "/CN=system:kube-scheduler"
gen_cert kube-proxy "/CN=system:kube-proxy"
gen_cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
kubeconfig() { # user file
  cat > "$2" <<KC
apiVersion: v1
kind: Config
clusters:
- name: cqrs-local
  cluster: {server: "https://$NODE_IP:$APISERVER_PORT", certificate-authority: "$PKI/ca.crt"}
users:
- name: $1
  user: {client-certificate: "$PKI/$1.crt", client-key: "$PKI/$1.key"}
contexts:
- name: cqrs-local
  context: {cluster: cqrs-local, user: $1}
current-context: cqrs-local
KC
}
kubeconfig admin "$KUBECONFIG_ADMIN"
for c in kube-controller-manager kube-scheduler kube-proxy kubelet; do kubeconfig "$c" "$CONF/$c.kubeconfig"; done

# --- Node configuration. ---------------------------------------------------------------------------------------
cat > "$CONF/containerd.toml" <<TOML
version = 2
root = "$CLUSTER_DIR/containerd/root"
state = "$CLUSTER_DIR/containerd/state"
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # This VM lacks CAP_SYS_RESOURCE: without this every sandbox fails in runc (oom_score_adj: permission denied).
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$CLUSTER_DIR/cni/net.d"
TOML
cat > "$CLUSTER_DIR/cni/net.d/10-$CNI_NETWORK.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
# Pods with dnsPolicy Default (CoreDNS) get this instead of the host's resolver: nothing is resolved off the machine.
printf 'nameserver 127.0.0.1\n' > "$CONF/resolv.conf"
cat > "$CONF/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
readOnlyPort: 0
cgroupDriver: cgroupfs
failCgroupV1: false
containerRuntimeEndpoint: unix://$SOCK
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
clusterDNS: [$DNS_IP]
clusterDomain: $CLUSTER_DOMAIN
resolvConf: "$CONF/resolv.conf"
tlsCertFile: "$PKI/kubelet-serving.crt"
tlsPrivateKeyFile: "$PKI/kubelet-serving.key"
failSwapOn: false
podLogsDir: "$CLUSTER_DIR/podlogs"
maxPods: 110
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
YAML
cat > "$CONF/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
clientConnection: {kubeconfig: "$CONF/kube-proxy.kubeconfig"}
conntrack: {maxPerCore: 0}
metricsBindAddress: 127.0.0.1:$PROXY_METRICS_PORT
healthzBindAddress: 127.0.0.1:$PROXY_HEALTHZ_PORT
YAML

# --- Kernel settings, recorded so that `down` restores them. --------------------------------------------------
modprobe br_netfilter 2>/dev/null || true
modprobe overlay 2>/dev/null || true
: > "$CLUSTER_DIR/sysctl.saved"
for s in net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables; do
  printf '%s=%s\n' "$s" "$(sysctl -n "$s")" >> "$CLUSTER_DIR/sysctl.saved"
done
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
# Egress guard: pods may talk to each other and to the node, never be forwarded anywhere else.
iptables -N CQRS-EGRESS 2>/dev/null || iptables -F CQRS-EGRESS
iptables -A CQRS-EGRESS -s "$POD_CIDR" -d "$POD_CIDR" -j RETURN
iptables -A CQRS-EGRESS -s "$POD_CIDR" -j DROP
iptables -A CQRS-EGRESS -d "$POD_CIDR" ! -s "$POD_CIDR" -i "$BRIDGE" -j RETURN
iptables -C FORWARD -j CQRS-EGRESS 2>/dev/null || iptables -I FORWARD 1 -j CQRS-EGRESS

# --- Processes, each PID recorded. ------------------------------------------------------------------------------
start() { # name command...
  local name=$1; shift
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/$name"
}
B="$K8S_BIN"
start etcd "$B/etcd" --name local --data-dir "$CLUSTER_DIR/etcd" --unsafe-no-fsync \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "local=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls ""
start kube-apiserver "$B/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port "$APISERVER_PORT" \
  --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" --client-ca-file "$PKI/ca.crt" \
  --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
  --service-account-issuer "https://kubernetes.default.svc.$CLUSTER_DOMAIN" \
  --service-cluster-ip-range "$SERVICE_CIDR" --authorization-mode Node,RBAC --allow-privileged=true \
  --enable-admission-plugins NodeRestriction \
  --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types InternalIP
start containerd containerd --config "$CONF/containerd.toml"
wait_for "the API server" 120 kc get --raw /readyz
log "API server ready ($((SECONDS - t0)) s)"
start kube-controller-manager "$B/kube-controller-manager" --kubeconfig "$CONF/kube-controller-manager.kubeconfig" \
  --authentication-kubeconfig "$CONF/kube-controller-manager.kubeconfig" \
  --authorization-kubeconfig "$CONF/kube-controller-manager.kubeconfig" \
  --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
  --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
  --use-service-account-credentials=true --leader-elect=false --bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
  --service-cluster-ip-range "$SERVICE_CIDR"
start kube-scheduler "$B/kube-scheduler" --kubeconfig "$CONF/kube-scheduler.kubeconfig" \
  --authentication-kubeconfig "$CONF/kube-scheduler.kubeconfig" --authorization-kubeconfig "$CONF/kube-scheduler.kubeconfig" \
  --leader-elect=false --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT"
wait_for "containerd" 60 ctr --address "$SOCK" version

# --- The node's own images: the pod sandbox and CoreDNS, from the binaries just built. --------------------------
key="$(basename "$B")"
for img in pause coredns; do
  tarball="$IMAGE_DIR/$img-$key.tar"
  if [[ ! -f "$tarball" ]]; then
    rootfs="$(mktemp -d)"
    install -D -m 0755 "$B/$img" "$rootfs/$img"
    if [[ $img == pause ]]; then ref="$PAUSE_IMAGE"; else ref="$COREDNS_IMAGE"; fi
    mkimage "$ref" "$rootfs" "$tarball" "[\"/$img\"]"
    rm -rf "$rootfs"
  fi
  ctr_ images import "$tarball" >/dev/null
done
log "node images imported ($((SECONDS - t0)) s)"

start kubelet "$B/kubelet" --config "$CONF/kubelet.yaml" --kubeconfig "$CONF/kubelet.kubeconfig" \
  --root-dir "$CLUSTER_DIR/kubelet" --node-ip "$NODE_IP" --hostname-override "$NODE_NAME"
start kube-proxy "$B/kube-proxy" --config "$CONF/kube-proxy.yaml"
wait_for "node $NODE_NAME to register" 120 kc get "node/$NODE_NAME"
kc wait --for=condition=Ready "node/$NODE_NAME" --timeout=180s >/dev/null
log "node $NODE_NAME Ready ($((SECONDS - t0)) s)"

# --- Cluster DNS. ---------------------------------------------------------------------------------------------------
wait_for "the default ServiceAccount" 120 kc -n kube-system get serviceaccount default
sed -e "s/@DNS_IP@/$DNS_IP/" -e "s/@DOMAIN@/$CLUSTER_DOMAIN/" -e "s#@IMAGE@#$COREDNS_IMAGE#" \
  "$ROOT/e2e/cluster/coredns.yaml" | kc apply -f - >/dev/null
kc -n kube-system rollout status deployment/coredns --timeout=300s >/dev/null
python3 "$ROOT/e2e/cluster/dns-check.py" "$DNS_IP" "kubernetes.default.svc.$CLUSTER_DOMAIN" "$KUBERNETES_SERVICE_IP" >&2
log "cluster up in $((SECONDS - t0)) s: node $NODE_NAME at $NODE_IP, pods $POD_CIDR, services $SERVICE_CIDR"
echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
