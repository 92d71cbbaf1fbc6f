#!/usr/bin/env bash
# Smoke test for the binaries from scripts/build-control-plane.sh:
# etcd + kube-apiserver on 127.0.0.1 (random ports, temp dirs), wait for
# /readyz, run kubectl against it; with FULL=1 also kube-controller-manager,
# kube-scheduler and kwok, create a fake node and a pod, and wait for the pod
# to be Running on the fake node. Everything is stopped and deleted on exit.
#
# Auth: static token file; the token's user is in group system:masters, so
# RBAC (the real authorizer) lets it do everything. The apiserver generates its
# own self-signed serving cert (--cert-dir); clients use --insecure-skip-tls-verify
# / curl -k. The service-account key pair is made with openssl.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.35.4}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-${ROOT}/.cache/k8s/${K8S_VERSION}/bin}"
FULL="${FULL:-0}"
KWOK_STAGES="${KWOK_STAGES:-${BIN}/../share/kwok/stages-fast.yaml}"
TIMEOUT="${TIMEOUT:-120}" # seconds per wait

for b in etcd kube-apiserver kubectl; do
  [[ -x "${BIN}/${b}" ]] || { echo "missing ${BIN}/${b}; run scripts/build-control-plane.sh" >&2; exit 1; }
done

TMP="$(mktemp -d -t fedkube-cp.XXXXXX)"
PIDS=()
# stop_pid PID: SIGTERM, up to 10s grace, then SIGKILL. (kube-apiserver's
# graceful shutdown can hang indefinitely on one SIGTERM - seen here when etcd
# went away at the same time - so never wait unbounded.)
stop_pid() {
  local p="$1" i
  kill "$p" 2>/dev/null || return 0
  for i in $(seq 1 20); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  # Reverse start order: clients first, etcd last.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
  if [[ $rc != 0 ]]; then
    echo "--- FAILED (rc=$rc); log tails:" >&2
    for f in "${TMP}"/*.log; do [[ -f $f ]] && { echo "== $f" >&2; tail -n 20 "$f" >&2; }; done
  fi
  rm -rf "${TMP}"
  exit $rc
}
trap cleanup EXIT INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
# wait_for DESCRIPTION COMMAND... : retry until success or TIMEOUT
wait_for() {
  local what="$1" t0=$SECONDS
  shift
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS - t0 > TIMEOUT)); then echo "timed out waiting for ${what}" >&2; return 1; fi
    sleep 0.5
  done
  echo "ok: ${what} ($((SECONDS - t0))s)"
}

ETCD_CLIENT_PORT="$(free_port)"
ETCD_PEER_PORT="$(free_port)"
API_PORT="$(free_port)"
ETCD_URL="http://127.0.0.1:${ETCD_CLIENT_PORT}"
API_URL="https://127.0.0.1:${API_PORT}"
TOKEN="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"

# --- etcd ------------------------------------------------------------------
"${BIN}/etcd" \
  --name=smoke \
  --data-dir="${TMP}/etcd" \
  --listen-client-urls="${ETCD_URL}" \
  --advertise-client-urls="${ETCD_URL}" \
  --listen-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}" \
  --initial-advertise-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}" \
  --initial-cluster="smoke=http://127.0.0.1:${ETCD_PEER_PORT}" \
  --unsafe-no-fsync \
  --log-level=warn \
  >"${TMP}/etcd.log" 2>&1 &
PIDS+=($!)
wait_for "etcd /health" curl -sf "${ETCD_URL}/health"

# --- kube-apiserver --------------------------------------------------------
openssl genrsa -out "${TMP}/sa.key" 2048 2>/dev/null
openssl rsa -in "${TMP}/sa.key" -pubout -out "${TMP}/sa.pub" 2>/dev/null
echo "${TOKEN},admin,admin,system:masters" >"${TMP}/tokens.csv"

"${BIN}/kube-apiserver" \
  --etcd-servers="${ETCD_URL}" \
  --bind-address=127.0.0.1 \
  --advertise-address=127.0.0.1 \
  --secure-port="${API_PORT}" \
  --cert-dir="${TMP}/certs" \
  --token-auth-file="${TMP}/tokens.csv" \
  --authorization-mode=RBAC \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="${TMP}/sa.pub" \
  --service-account-signing-key-file="${TMP}/sa.key" \
  --service-cluster-ip-range=10.96.0.0/16 \
  --allow-privileged=true \
  >"${TMP}/kube-apiserver.log" 2>&1 &
PIDS+=($!)
readyz() { [[ "$(curl -sk -H "Authorization: Bearer ${TOKEN}" "${API_URL}/readyz")" == ok ]]; }
wait_for "kube-apiserver /readyz" readyz

cat >"${TMP}/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: smoke
  cluster:
    server: ${API_URL}
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: ${TOKEN}
contexts:
- name: smoke
  context: {cluster: smoke, user: admin}
current-context: smoke
EOF
export KUBECONFIG="${TMP}/kubeconfig"
"${BIN}/kubectl" version
"${BIN}/kubectl" get namespaces
if [[ -x "${BIN}/helm" ]]; then "${BIN}/helm" list --all-namespaces; fi

if [[ "${FULL}" != 1 ]]; then
  echo "SMOKE OK (etcd + kube-apiserver); set FULL=1 for controller-manager/scheduler/kwok"
  exit 0
fi

# --- kube-controller-manager, kube-scheduler, kwok -------------------------
"${BIN}/kube-controller-manager" \
  --kubeconfig="${KUBECONFIG}" \
  --authentication-kubeconfig="${KUBECONFIG}" \
  --authorization-kubeconfig="${KUBECONFIG}" \
  --bind-address=127.0.0.1 --secure-port=0 \
  --leader-elect=false \
  --service-account-private-key-file="${TMP}/sa.key" \
  --root-ca-file="${TMP}/certs/apiserver.crt" \
  --use-service-account-credentials=false \
  --controllers='*,-nodeipam,-cloud-node-lifecycle' \
  >"${TMP}/kube-controller-manager.log" 2>&1 &
PIDS+=($!)
"${BIN}/kube-scheduler" \
  --kubeconfig="${KUBECONFIG}" \
  --authentication-kubeconfig="${KUBECONFIG}" \
  --authorization-kubeconfig="${KUBECONFIG}" \
  --bind-address=127.0.0.1 --secure-port=0 \
  --leader-elect=false \
  >"${TMP}/kube-scheduler.log" 2>&1 &
PIDS+=($!)
"${BIN}/kwok" \
  --kubeconfig="${KUBECONFIG}" \
  --manage-all-nodes=false \
  --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --manage-nodes-with-label-selector= \
  --config="${KWOK_STAGES}" \
  --cidr=10.0.0.1/24 \
  --node-ip=10.0.0.1 \
  --node-lease-duration-seconds=40 \
  --server-address= \
  >"${TMP}/kwok.log" 2>&1 &
PIDS+=($!)

"${BIN}/kubectl" apply -f - <<'EOF'
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-0
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/hostname: kwok-node-0
spec:
  taints:
  - {key: kwok.x-k8s.io/node, value: fake, effect: NoSchedule}
EOF
node_ready() {
  [[ "$("${BIN}/kubectl" get node kwok-node-0 -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]
}
wait_for "fake node Ready" node_ready
# The default ServiceAccount is created by the controller-manager.
wait_for "default serviceaccount" "${BIN}/kubectl" get serviceaccount default
"${BIN}/kubectl" apply -f - <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: smoke}
spec:
  replicas: 2
  selector: {matchLabels: {app: smoke}}
  template:
    metadata: {labels: {app: smoke}}
    spec:
      nodeSelector: {type: kwok}
      tolerations:
      - {key: kwok.x-k8s.io/node, operator: Exists, effect: NoSchedule}
      containers:
      - {name: c, image: fake-image}
EOF
two_ready() { [[ "$("${BIN}/kubectl" get deployment smoke -o jsonpath='{.status.readyReplicas}')" == 2 ]]; }
wait_for "2 pods Running/Ready on the fake node" two_ready
"${BIN}/kubectl" get nodes,pods -o wide
echo "SMOKE OK (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok)"
