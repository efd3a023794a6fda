#!/usr/bin/env bash
# Starts etcd and kube-apiserver on loopback for the operator's integration tests (envtest style: no kubelet,
# no controllers). Usage: kube-up.sh <dir> <bin-dir> <apiserver-port> <etcd-client-port> <etcd-peer-port>
# Prints "READY <kubeconfig>" when the API server answers /readyz, then stays in the foreground. On SIGTERM
# (sent by the kernel when the test process dies: the harness starts this script with setpriv --pdeathsig)
# it stops both servers and deletes <dir>.
set -euo pipefail
dir="$1"; bin="$2"; port="$3"; etcd_port="$4"; peer_port="$5"
certs="$dir/certs"; mkdir -p "$certs"

cleanup() {
  echo "cleanup: stopping test servers" >&2
  trap '' TERM INT HUP  # a second signal must not interrupt the cleanup
  # Throwaway servers: SIGKILL, a graceful apiserver shutdown would wait on the already-stopping etcd.
  local pids; pids="$(jobs -p)"
  kill -KILL $pids 2>/dev/null || true
  echo "cleanup: killed [$pids]" >&2
  wait 2>/dev/null || true
  echo "cleanup: waited" >&2
  # `wait` can return early inside a trap; make sure the servers are gone before deleting their files.
  for _ in $(seq 100); do kill -0 $pids 2>/dev/null || break; sleep 0.05; done
  echo "cleanup: removing $dir" >&2
  rm -rf "$dir" || { sleep 0.2; rm -rf "$dir"; }
}
trap 'cleanup; exit 0' TERM INT HUP

# A CA, an API server serving certificate for 127.0.0.1, a client certificate in system:masters and the
# service-account signing key.
openssl_quiet() { openssl "$@" 2>/dev/null; }
openssl_quiet req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=cqrs-test-ca" \
  -keyout "$certs/ca.key" -out "$certs/ca.crt"
openssl_quiet req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout "$certs/server.key" -out "$certs/server.csr"
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' > "$certs/server.ext"
openssl_quiet x509 -req -in "$certs/server.csr" -CA "$certs/ca.crt" -CAkey "$certs/ca.key" -CAcreateserial \
  -days 2 -extfile "$certs/server.ext" -out "$certs/server.crt"
openssl_quiet req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=cqrs-test-admin" -keyout "$certs/client.key" -out "$certs/client.csr"
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > "$certs/client.ext"
openssl_quiet x509 -req -in "$certs/client.csr" -CA "$certs/ca.crt" -CAkey "$certs/ca.key" -CAcreateserial \
  -days 2 -extfile "$certs/client.ext" -out "$certs/client.crt"
openssl_quiet genrsa -out "$certs/sa.key" 2048
openssl_quiet rsa -in "$certs/sa.key" -pubout -out "$certs/sa.pub"

b64() { base64 -w0 < "$1"; }
cat > "$dir/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(b64 "$certs/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(b64 "$certs/client.crt")
    client-key-data: $(b64 "$certs/client.key")
contexts:
- name: test
  context: {cluster: test, user: admin, namespace: default}
current-context: test
KC

setpriv --pdeathsig SIGKILL -- "$bin/etcd" --name test --data-dir "$dir/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "test=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level warn \
  > "$dir/etcd.log" 2>&1 &

setpriv --pdeathsig SIGKILL -- "$bin/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$port" \
  --cert-dir "$certs" --tls-cert-file "$certs/server.crt" --tls-private-key-file "$certs/server.key" \
  --client-ca-file "$certs/ca.crt" \
  --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true \
  --authorization-mode RBAC --disable-admission-plugins ServiceAccount \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$certs/sa.pub" --service-account-signing-key-file "$certs/sa.key" \
  > "$dir/apiserver.log" 2>&1 &

# Readiness is a condition, not a sleep: poll /readyz until it answers ok (or a server died, or 120 s passed).
deadline=$((SECONDS + 120))
until curl -fsS --cacert "$certs/ca.crt" --cert "$certs/client.crt" --key "$certs/client.key" \
    "https://127.0.0.1:$port/readyz" >/dev/null 2>&1; do
  if (( SECONDS > deadline )) || [[ $(jobs -rp | wc -l) -lt 2 ]]; then
    echo "FAILED see $dir/apiserver.log and $dir/etcd.log" >&2
    tail -20 "$dir/apiserver.log" "$dir/etcd.log" >&2 || true
    echo "FAILED"
    exit 1
  fi
  sleep 0.2
done
echo "READY $dir/kubeconfig"
# Stay in the foreground; `wait` returns when a server exits or a trap fires.
wait -n || true
echo "a test server exited; logs in $dir" >&2
jobs -p | xargs -r kill 2>/dev/null || true
wait || true
