#!/usr/bin/env bash
# Build a loopback Kubernetes control plane for tests from Go modules only
# (no GitHub release downloads): etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok and helm, with the local Go toolchain.
#
# Outputs:   .cache/k8s/<K8S_VERSION>/bin/   (git-ignored)
#            .cache/k8s/<K8S_VERSION>/share/kwok/stages-fast.yaml (kwok --config)
# Scratch:   .cache/k8s/<K8S_VERSION>/src/   (throwaway wrapper modules)
# Go caches: left at their defaults (GOCACHE, GOMODCACHE) so a fresh clone on
#            the same machine only pays for linking.
# Shared:    scripts/lib/go-build.sh (layout, flags, stamps, wrapper modules;
#            also used by scripts/build-node.sh, which adds the node binaries)
#
# Idempotent: a binary is skipped when it exists and its stamp file
# (bin/.<name>.version) matches the pinned version. Override versions with
# the environment variables below. Any failure stops the script.
# Proof that the binaries run, with the exact flags: scripts/control-plane-smoke.sh
#
# Why wrapper modules: `go install k8s.io/kubernetes/cmd/...@vX` and
# `go install go.etcd.io/etcd/server/v3@vX` are refused because those go.mod
# files contain `replace` directives (k8s: staging modules pinned at v0.0.0 and
# replaced by ./staging/src/...; etcd: ../api, ../client/... ). A throwaway
# main module that requires them and re-pins every replaced module to its
# published version builds fine. kwok and helm have no replace directives, but
# they go through the same wrapper path so all builds share one code path and
# one set of flags.
set -euo pipefail

# K8S_VERSION (default v1.35.4) is pinned in scripts/lib/go-build.sh, shared
# with scripts/build-node.sh so node and control plane always match.
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"

WRAPPER_MODULE="fedkube.invalid/control-plane-build"
# shellcheck source-path=SCRIPTDIR source=lib/go-build.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/go-build.sh"
KWOK_STAGES="${BASE}/share/kwok/stages-fast.yaml" # kwok --config file

# ---------------------------------------------------------------- etcd ----
build_etcd() {
  local t=$SECONDS
  if up_to_date etcd "${ETCD_VERSION}"; then
    echo ">>> etcd ${ETCD_VERSION}: up to date, skipping"
    return
  fi
  echo ">>> building etcd ${ETCD_VERSION}"
  # The `etcd` main package is the root of go.etcd.io/etcd/server/v3
  # (server/main.go). The root module go.etcd.io/etcd/v3 is not tagged for
  # recent 3.6.x patches on the proxy, and its main is not etcd anyway.
  local gomod goline
  gomod="$(module_gomod go.etcd.io/etcd/server/v3 "${ETCD_VERSION}")"
  goline="$(grep -m1 '^go ' "${gomod}")"
  # server/v3's own replaces point at ../api, ../client/...; pin those
  # modules to the same published version instead.
  local replaces="" m
  for m in $(sed -n 's/^[[:space:]]*\(go\.etcd\.io\/etcd\/[^ ]*\) => \.\..*/\1/p' "${gomod}"); do
    replaces+="	${m} => ${m} ${ETCD_VERSION}"$'\n'
  done
  make_wrapper "${SRC}/etcd" "${goline}" \
    "	go.etcd.io/etcd/server/v3 ${ETCD_VERSION}" "${replaces%$'\n'}" \
    go.etcd.io/etcd/server/v3
  (cd "${SRC}/etcd" && go build "${BUILD_FLAGS[@]}" \
    -ldflags="-s -w" -o "${BIN}/etcd" go.etcd.io/etcd/server/v3)
  stamp etcd "${ETCD_VERSION}"
  step "etcd ${ETCD_VERSION}" $((SECONDS - t))
}

# ---------------------------------------------------------- kubernetes ----
K8S_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
build_kubernetes() {
  build_k8s_cmds "${SRC}/kubernetes" "kubernetes" "${K8S_CMDS[@]}"
}

# ---------------------------------------------------------------- kwok ----
build_kwok() {
  local t=$SECONDS
  if up_to_date kwok "${KWOK_VERSION}" && [[ -f "${KWOK_STAGES}" ]]; then
    echo ">>> kwok ${KWOK_VERSION}: up to date, skipping"
    return
  fi
  echo ">>> building kwok ${KWOK_VERSION}"
  plain_wrapper kwok sigs.k8s.io/kwok "${KWOK_VERSION}" sigs.k8s.io/kwok/cmd/kwok
  (cd "${SRC}/kwok" && go build "${BUILD_FLAGS[@]}" \
    -ldflags="-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v} -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${K8S_VERSION#v}" \
    -o "${BIN}/kwok" sigs.k8s.io/kwok/cmd/kwok)
  # kwok does nothing without Stage objects ("no stages found"). Ship the
  # upstream "fast" set (what kwokctl uses by default: node-initialize,
  # node-heartbeat-with-lease, pod-ready, pod-complete, pod-delete) as one file
  # for `kwok --config=<file>`, taken from the same module version.
  local kdir f
  kdir="$(cd "${SRC}/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"
  mkdir -p "$(dirname "${KWOK_STAGES}")"
  for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
    pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
    echo "---"
    cat "${kdir}/kustomize/stage/${f}.yaml"
  done >"${KWOK_STAGES}"
  stamp kwok "${KWOK_VERSION}"
  step "kwok ${KWOK_VERSION}" $((SECONDS - t))
}

# ---------------------------------------------------------------- helm ----
build_helm() {
  local t=$SECONDS
  if up_to_date helm "${HELM_VERSION}"; then
    echo ">>> helm ${HELM_VERSION}: up to date, skipping"
    return
  fi
  echo ">>> building helm ${HELM_VERSION}"
  plain_wrapper helm helm.sh/helm/v3 "${HELM_VERSION}" helm.sh/helm/v3/cmd/helm
  # As helm's Makefile: default kube version for `helm template`/lint is
  # derived from the client-go it is built with (v0.Y.Z -> 1.Y); left unset it
  # is v1.20.0, which breaks charts with a `kubeVersion` constraint.
  local cg kmaj kmin ld
  cg="$(cd "${SRC}/helm" && go list -m -f '{{.Version}}' k8s.io/client-go)"
  cg="${cg#v}"
  kmaj=$((${cg%%.*} + 1))
  kmin="${cg#*.}"
  kmin="${kmin%%.*}"
  ld="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
  ld+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  ld+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=${kmaj}"
  ld+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=${kmin}"
  ld+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=${kmaj}"
  ld+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=${kmin}"
  (cd "${SRC}/helm" && go build "${BUILD_FLAGS[@]}" -ldflags="${ld}" \
    -o "${BIN}/helm" helm.sh/helm/v3/cmd/helm)
  stamp helm "${HELM_VERSION}"
  step "helm ${HELM_VERSION}" $((SECONDS - t))
}

build_etcd
build_kubernetes
build_kwok
build_helm

echo
echo "=== versions (${BIN})"
"${BIN}/etcd" --version | sed -n 1p  # sed reads it all: head -n1 could end etcd with SIGPIPE (exit 141 under pipefail)
for c in kube-apiserver kube-controller-manager kube-scheduler; do "${BIN}/${c}" --version; done
"${BIN}/kubectl" version --client
"${BIN}/kwok" --version
"${BIN}/helm" version --short
print_timings
