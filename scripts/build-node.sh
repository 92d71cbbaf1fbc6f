#!/usr/bin/env bash
# Build what a real Kubernetes node needs on top of scripts/build-control-plane.sh,
# from Go modules only (no GitHub release downloads), and install the Debian
# packages a node needs:
#   kubelet, kube-proxy            k8s.io/kubernetes at K8S_VERSION (as the control plane)
#   containerd, containerd-shim-runc-v2, ctr
#                                  github.com/containerd/containerd/v2
#   coredns                        github.com/coredns/coredns
#   registry                       github.com/distribution/distribution/v3
#   pause                          k8s.io/kubernetes's build/pause/linux/pause.c (gcc -static)
#   Debian: runc, containernetworking-plugins (CNI plugins in /usr/lib/cni),
#           iptables, conntrack, socat (only those missing; apt-get update once)
#
# Outputs:   .cache/k8s/<K8S_VERSION>/bin/   (same dir as the control plane)
#            .cache/k8s/<K8S_VERSION>/share/pause/pause
# Scratch:   .cache/k8s/<K8S_VERSION>/src/{kubernetes-node,containerd,coredns,registry}
#
# Usage: scripts/build-node.sh [debs|pause|containerd|coredns|registry|kubernetes]...
#        (default: all of them, in that order; kubelet/kube-proxy, the biggest,
#        come last). Idempotent like build-control-plane.sh: a binary is skipped
#        when its stamp file (.<name>.version beside it) matches the pinned
#        version. Layout, flags, stamps and wrapper modules are shared with it:
#        scripts/lib/go-build.sh. Any failure stops the script.
#
# None of containerd, coredns or distribution has replace directives in its
# go.mod, so they go through plain wrappers (which refuse a go.mod that grows
# some); k8s.io/kubernetes gets its staging modules re-pinned as for the
# control plane. Everything is CGO_ENABLED=0, kubelet included: upstream links
# kubelet with cgo, but the only cgo in its package graph is the standard
# library's (glibc DNS resolver and user lookups in net, os/user), which have
# pure-Go fallbacks. containerd's btrfs snapshotter needs cgo and is left out (its
# files are `cgo`-constrained; no_btrfs makes that explicit); devmapper and
# zfs are pure Go (they shell out to dmsetup/zfs) and stay in.
# ethtool is not installed: neither kubelet nor kube-proxy runs it, and
# kubeadm's preflight stopped asking for it. runc needs cgo (libseccomp,
# nsexec) so it comes from Debian.
set -euo pipefail

CONTAINERD_VERSION="${CONTAINERD_VERSION:-v2.4.2}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.15.0}"
REGISTRY_VERSION="${REGISTRY_VERSION:-v3.1.2}"
NODE_DEBS=(runc containernetworking-plugins iptables conntrack socat)

WRAPPER_MODULE="fedkube.invalid/node-build"
# shellcheck source-path=SCRIPTDIR source=lib/go-build.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/go-build.sh"
PAUSE_DIR="${BASE}/share/pause"

deb_installed() { [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]; }

APT_UPDATED=0
# apt_install_missing PKG... -> install those Debian packages not installed yet
apt_install_missing() {
  local p absent=() sudo=()
  for p in "$@"; do deb_installed "$p" || absent+=("$p"); done
  ((${#absent[@]})) || return 0
  ((EUID == 0)) || sudo=(sudo)
  echo ">>> installing Debian packages: ${absent[*]}"
  if ((APT_UPDATED == 0)); then
    "${sudo[@]}" apt-get update -qq -o DPkg::Lock::Timeout=300
    APT_UPDATED=1
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends -o DPkg::Lock::Timeout=300 "${absent[@]}"
}

# ---------------------------------------------------------------- debs ----
install_debs() {
  local t=$SECONDS p missing=0
  for p in "${NODE_DEBS[@]}"; do deb_installed "$p" || missing=1; done
  if [[ $missing == 0 ]]; then
    echo ">>> Debian packages (${NODE_DEBS[*]}): installed, skipping"
    return
  fi
  apt_install_missing "${NODE_DEBS[@]}"
  step "debian packages" $((SECONDS - t))
}

# --------------------------------------------------------------- pause ----
build_pause() {
  local t=$SECONDS
  if up_to_date pause "${K8S_VERSION}" "${PAUSE_DIR}"; then
    echo ">>> pause (${K8S_VERSION}): up to date, skipping"
    return
  fi
  echo ">>> building pause from k8s.io/kubernetes ${K8S_VERSION}"
  apt_install_missing gcc libc6-dev
  local kdir tag
  kdir="$(module_dir k8s.io/kubernetes "${K8S_VERSION}")"
  # The image tag its Makefile would build (`TAG ?= 3.10.1`), for `pause -v`.
  tag="$(sed -n 's/^TAG ?= *//p' "${kdir}/build/pause/Makefile")"
  mkdir -p "${PAUSE_DIR}"
  # As build/pause/Makefile, minus the git revision suffix.
  gcc -Os -Wall -Werror -static -DVERSION="v${tag}" \
    -o "${PAUSE_DIR}/pause" "${kdir}/build/pause/linux/pause.c"
  strip "${PAUSE_DIR}/pause"
  stamp pause "${K8S_VERSION}" "${PAUSE_DIR}"
  step "pause ${tag} (${K8S_VERSION})" $((SECONDS - t))
}

# ---------------------------------------------------------- containerd ----
CONTAINERD_CMDS=(containerd containerd-shim-runc-v2 ctr)
build_containerd() {
  local t=$SECONDS c missing=0
  for c in "${CONTAINERD_CMDS[@]}"; do up_to_date "$c" "${CONTAINERD_VERSION}" || missing=1; done
  if [[ $missing == 0 ]]; then
    echo ">>> containerd ${CONTAINERD_VERSION}: up to date, skipping"
    return
  fi
  echo ">>> building ${CONTAINERD_CMDS[*]} ${CONTAINERD_VERSION}"
  local mod=github.com/containerd/containerd/v2
  local pkgs=()
  for c in "${CONTAINERD_CMDS[@]}"; do pkgs+=("${mod}/cmd/${c}"); done
  plain_wrapper containerd "${mod}" "${CONTAINERD_VERSION}" "${pkgs[@]}"
  # As its Makefile: version.Version/Package (Revision is a git sha the module
  # proxy does not carry, left empty); tags as its GO_BUILDTAGS, the shim's
  # plus no_grpc (SHIM_GO_BUILDTAGS).
  local ld="-s -w -X ${mod}/version.Version=${CONTAINERD_VERSION} -X ${mod}/version.Package=${mod}"
  local tmp="${BIN}/.containerd-build"
  rm -rf "${tmp}" && mkdir -p "${tmp}"
  (cd "${SRC}/containerd" &&
    go build "${BUILD_FLAGS[@]}" -tags "urfave_cli_no_docs no_btrfs" -ldflags="${ld}" \
      -o "${tmp}/" "${mod}/cmd/containerd" "${mod}/cmd/ctr" &&
    go build "${BUILD_FLAGS[@]}" -tags "urfave_cli_no_docs no_btrfs no_grpc" -ldflags="${ld}" \
      -o "${tmp}/" "${mod}/cmd/containerd-shim-runc-v2")
  for c in "${CONTAINERD_CMDS[@]}"; do
    mv -f "${tmp}/${c}" "${BIN}/${c}"
    stamp "${c}" "${CONTAINERD_VERSION}"
  done
  rmdir "${tmp}"
  step "containerd ${CONTAINERD_VERSION} (3 bins)" $((SECONDS - t))
}

# ------------------------------------------------------------- coredns ----
build_coredns() {
  local t=$SECONDS
  if up_to_date coredns "${COREDNS_VERSION}"; then
    echo ">>> coredns ${COREDNS_VERSION}: up to date, skipping"
    return
  fi
  echo ">>> building coredns ${COREDNS_VERSION}"
  # The main package is the module root (coredns.go); the plugin set is the
  # generated core/plugin/zplugin.go shipped in the module (upstream default).
  # The version is a constant (coremain.CoreVersion); GitCommit stays empty.
  plain_wrapper coredns github.com/coredns/coredns "${COREDNS_VERSION}" github.com/coredns/coredns
  (cd "${SRC}/coredns" && go build "${BUILD_FLAGS[@]}" -ldflags="-s -w" \
    -o "${BIN}/coredns" github.com/coredns/coredns)
  stamp coredns "${COREDNS_VERSION}"
  step "coredns ${COREDNS_VERSION}" $((SECONDS - t))
}

# ------------------------------------------------------------ registry ----
build_registry() {
  local t=$SECONDS
  if up_to_date registry "${REGISTRY_VERSION}"; then
    echo ">>> registry ${REGISTRY_VERSION}: up to date, skipping"
    return
  fi
  echo ">>> building registry ${REGISTRY_VERSION}"
  local mod=github.com/distribution/distribution/v3
  plain_wrapper registry "${mod}" "${REGISTRY_VERSION}" "${mod}/cmd/registry"
  (cd "${SRC}/registry" && go build "${BUILD_FLAGS[@]}" \
    -ldflags="-s -w -X ${mod}/version.version=${REGISTRY_VERSION} -X ${mod}/version.mainpkg=${mod}" \
    -o "${BIN}/registry" "${mod}/cmd/registry")
  stamp registry "${REGISTRY_VERSION}"
  step "registry ${REGISTRY_VERSION}" $((SECONDS - t))
}

# ---------------------------------------------------------- kubernetes ----
K8S_NODE_CMDS=(kubelet kube-proxy)
build_kubernetes_node() {
  # Own wrapper dir, so build-control-plane.sh's src/kubernetes is untouched.
  build_k8s_cmds "${SRC}/kubernetes-node" "kubelet/kube-proxy" "${K8S_NODE_CMDS[@]}"
}

ALL=(debs pause containerd coredns registry kubernetes)
(($#)) || set -- "${ALL[@]}"
for what in "$@"; do
  case "${what}" in
    debs) install_debs ;;
    pause) build_pause ;;
    containerd) build_containerd ;;
    coredns) build_coredns ;;
    registry) build_registry ;;
    kubernetes) build_kubernetes_node ;;
    *) echo "unknown component '${what}' (one of: ${ALL[*]})" >&2; exit 2 ;;
  esac
done

# version CMD... -> run it if the binary exists, else say it is not built yet
version() {
  if [[ -x "$1" ]]; then "$@"; else echo "$(basename "$1"): not built (run without arguments)"; fi
}
echo
echo "=== versions (${BIN})"
version "${BIN}/kubelet" --version
version "${BIN}/kube-proxy" --version
version "${BIN}/containerd" --version
version "${BIN}/ctr" --version
version "${BIN}/coredns" -version
version "${BIN}/registry" --version
version "${PAUSE_DIR}/pause" -v
if command -v runc >/dev/null; then runc --version | sed -n 1p; else echo "runc: not installed"; fi
if [[ -d /usr/lib/cni ]]; then
  echo "CNI plugins: /usr/lib/cni ($(find /usr/lib/cni -maxdepth 1 -type f -perm -u+x | wc -l) plugins)"
else
  echo "CNI plugins: /usr/lib/cni missing (containernetworking-plugins not installed?)"
fi
echo "bin dir: $(du -sh "${BIN}" | cut -f1)"
print_timings
