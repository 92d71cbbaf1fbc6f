#!/usr/bin/env bash
# Build fedkube's container images with podman, with no container registry:
#
#   fedkube-base:bookworm     Debian bookworm (minbase) + python3, made by mmdebstrap from
#                             Debian's packages and imported: the base of everything below
#   fedkube:<version>         the Dockerfile's `full` target (workers, global aggregator)
#   fedkube-slim:<version>    the Dockerfile's `slim` target (operator, combiners)
#   fedkube-redis:<version>   redis-server from Debian, for the chart's bundled Redis where
#                             no registry serves the upstream image (the test node, make cluster)
#   pause:<PAUSE_VERSION>     the node's sandbox image, from Kubernetes' own pause.c
#                             (compiled by scripts/build-node.sh)
#
# Idempotent: the base is made only when missing; podman's layer cache makes a rebuild
# after a code change take seconds (only fedkube's own layer changes). Images live in
# podman's storage (/var/lib/containers for root), outside the repository, so a fresh
# clone on the same machine reuses them. Usage: scripts/build-images.sh [--print-sizes]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"
export CONTAINERS_CONF="${ROOT}/scripts/containers.conf"

K8S_VERSION="${K8S_VERSION:-v1.35.4}"
PAUSE_VERSION="3.10"
PAUSE_BIN="${ROOT}/.cache/k8s/${K8S_VERSION}/share/pause/pause"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1)"
BASE="fedkube-base:bookworm"

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
missing=()
for tool in podman buildah mmdebstrap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  echo "build-images: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq podman buildah mmdebstrap uidmap runc >/dev/null
fi

START=$SECONDS
declare -a TIMINGS=()

# Nothing to do when the build's inputs are those of the last build and its images are
# still in podman's storage: a content hash of everything the builds read, kept beside the
# node's caches (machine-wide, like podman's storage), answers in a second where podman
# would spend a minute and a half checking the 6.7 GB layer against its cache.
STAMP="$(dirname "${FEDKUBE_NODE_CACHE:-/var/lib/fedkube/node}")/images.sha256"
inputs_hash() {
  find Dockerfile .dockerignore pyproject.toml README.md scripts/image-requirements.py \
    scripts/containers.conf scripts/images scripts/build-images.sh \
    core aggregator workers operator "${PAUSE_BIN}" \
    -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 2>/dev/null |
    sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}
ALL_IMAGES=("fedkube-slim:${VERSION}" "fedkube:${VERSION}" "fedkube-redis:${VERSION}" "pause:${PAUSE_VERSION}")
all_exist() {
  local image
  for image in "${ALL_IMAGES[@]}"; do podman image exists "${image}" || return 1; done
}
HASH="$(inputs_hash)"
if [[ -f "${STAMP}" && "$(cat "${STAMP}")" == "${HASH}" ]] && all_exist; then
  echo "build-images: up to date (${HASH:0:12}), nothing to build"
  exit 0
fi
step() { TIMINGS+=("$(printf '%-28s %5ss' "$1" "$2")"); }

# ---------------------------------------------------------------- base ----
if ! podman image exists "${BASE}"; then
  t=$SECONDS
  echo ">>> making ${BASE} with mmdebstrap (Debian bookworm minbase + python3)"
  tar="$(mktemp --suffix=.tar)"
  trap 'rm -f "${tar}"' EXIT
  # No docs, man pages or apt lists in the image; ca-certificates for HTTPS to a central
  # site. mmdebstrap takes the mirror from this machine's apt sources.
  mmdebstrap --quiet --variant=minbase --mode=root \
    --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    bookworm "${tar}"
  podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    "${tar}" "${BASE}" >/dev/null
  rm -f "${tar}"
  step "${BASE}" $((SECONDS - t))
fi

# pip inside the build trusts what pip here trusts (a proxy's certificate authority).
CA_BUNDLE="${PIP_CERT:-$(pip3 config get global.cert 2>/dev/null || true)}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
SECRET=()
if [[ -s "${CA_BUNDLE}" ]]; then SECRET=(--secret "id=ca-bundle,src=${CA_BUNDLE}"); fi

build() { # build TAG TARGET
  local t=$SECONDS
  echo ">>> building $1 (target $2)"
  podman build --quiet --pull=never --network=host --layers --force-rm "${SECRET[@]}" \
    --build-arg "BASE_IMAGE=${BASE}" --target "$2" -t "$1" -f Dockerfile . >/dev/null
  step "$1" $((SECONDS - t))
}
build "fedkube-slim:${VERSION}" slim
build "fedkube:${VERSION}" full

# --------------------------------------------------------------- redis ----
t=$SECONDS
podman build --quiet --pull=never --network=host --layers --build-arg "BASE_IMAGE=${BASE}" \
  -t "fedkube-redis:${VERSION}" -f scripts/images/redis.Containerfile scripts/images >/dev/null
step "fedkube-redis:${VERSION}" $((SECONDS - t))

# --------------------------------------------------------------- pause ----
if [[ -x "${PAUSE_BIN}" ]]; then
  t=$SECONDS
  podman build --quiet --pull=never --layers -t "pause:${PAUSE_VERSION}" \
    -f scripts/images/pause.Containerfile "$(dirname "${PAUSE_BIN}")" >/dev/null
  step "pause:${PAUSE_VERSION}" $((SECONDS - t))
else
  echo ">>> no ${PAUSE_BIN}: pause image skipped (scripts/build-node.sh compiles it)"
fi

if [[ -x "${PAUSE_BIN}" ]]; then
  mkdir -p "$(dirname "${STAMP}")"
  echo "${HASH}" >"${STAMP}"
fi

echo
echo "=== images"
podman images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' \
  | grep -E "/(fedkube|fedkube-slim|fedkube-redis|fedkube-base|pause):" || true
echo "=== timings"
if ((${#TIMINGS[@]})); then printf '%s\n' "${TIMINGS[@]}"; fi
echo "total: $((SECONDS - START))s"
