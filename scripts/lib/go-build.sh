# shellcheck shell=bash
# Shared by scripts/build-control-plane.sh and scripts/build-node.sh (source
# it, do not run it): output layout, Go flags, version stamps, throwaway
# wrapper modules and the timings table. Both scripts build into the same
# .cache/k8s/<K8S_VERSION>/bin/, so the Kubernetes version is pinned here once.
#
# The sourcing script sets WRAPPER_MODULE (module path of its wrapper
# modules) first; K8S_VERSION is overridable from the environment as usual.

K8S_VERSION="${K8S_VERSION:-v1.35.4}"
: "${WRAPPER_MODULE:?set WRAPPER_MODULE before sourcing go-build.sh}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BASE="${ROOT}/.cache/k8s/${K8S_VERSION}"
BIN="${BASE}/bin"
SRC="${BASE}/src"
mkdir -p "${BIN}" "${SRC}"

# Static, lean, reproducible binaries; never switch toolchains behind our back
# (a go.mod `toolchain` line newer than the local Go would otherwise try to
# download one).
export CGO_ENABLED=0
export GOTOOLCHAIN=local
export GOFLAGS="-buildvcs=false"
BUILD_FLAGS=(-trimpath)
FIXED_DATE="1970-01-01T00:00:00Z" # constant so relinks are reproducible

command -v go >/dev/null || { echo "go not found on PATH" >&2; exit 1; }
echo "go: $(go version)"
echo "output: ${BIN}"

SCRIPT_START=$SECONDS
declare -a TIMINGS=()

# up_to_date NAME VERSION [DIR] -> 0 if DIR/NAME (default bin/) exists and
# was built at VERSION (stamp file DIR/.NAME.version)
up_to_date() {
  local dir="${3:-${BIN}}"
  [[ -x "${dir}/$1" && -f "${dir}/.$1.version" && "$(cat "${dir}/.$1.version")" == "$2" ]]
}
stamp() { echo "$2" >"${3:-${BIN}}/.$1.version"; } # stamp NAME VERSION [DIR]

# make_wrapper DIR GO_LINE REQUIRE_LINES REPLACE_LINES PKG...
# Writes a throwaway main module that blank-imports the wanted main packages
# from a `tools`-tagged file (never compiled, only seen by `go mod tidy`).
make_wrapper() {
  local dir="$1" goline="$2" requires="$3" replaces="$4"
  shift 4
  rm -rf "${dir}"
  mkdir -p "${dir}"
  {
    echo "module ${WRAPPER_MODULE}"
    echo
    echo "${goline}"
    echo
    echo "require ("
    echo "${requires}"
    echo ")"
    if [[ -n "${replaces}" ]]; then
      echo
      echo "replace ("
      echo "${replaces}"
      echo ")"
    fi
  } >"${dir}/go.mod"
  {
    echo "//go:build tools"
    echo
    echo "package tools"
    echo
    echo "import ("
    local p
    for p in "$@"; do echo "	_ \"${p}\""; done
    echo ")"
  } >"${dir}/tools.go"
  (cd "${dir}" && go mod tidy)
}

# module_gomod MODULE VERSION -> path of that module's go.mod in the mod cache
module_gomod() {
  (cd "${SRC}" && GOFLAGS= go mod download -json "$1@$2") |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p'
}

# module_dir MODULE VERSION -> that module's source tree in the mod cache
module_dir() {
  (cd "${SRC}" && GOFLAGS= go mod download -json "$1@$2") |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p'
}

# plain_wrapper NAME MODULE VERSION PKG... -> wrapper module in src/NAME for a
# module whose go.mod needs no re-pinning (refuses one with replace directives)
plain_wrapper() {
  local name="$1" module="$2" version="$3" gomod
  shift 3
  gomod="$(module_gomod "${module}" "${version}")"
  if grep -q '=>' "${gomod}"; then
    echo "${name} ${version} go.mod has replace directives; teach this script about them" >&2
    exit 1
  fi
  make_wrapper "${SRC}/${name}" "$(grep -m1 '^go ' "${gomod}")" "	${module} ${version}" "" "$@"
}

# k8s_wrapper DIR PKG... -> wrapper module for k8s.io/kubernetes K8S_VERSION
# main packages. Its go.mod pins the staging modules (k8s.io/api, ...) at
# v0.0.0 and replaces them by ./staging/src/...; re-pin each one to its
# published version instead: k8s.io/kubernetes vX.Y.Z <-> staging v0.Y.Z.
k8s_wrapper() {
  local dir="$1" gomod goline godebug staging_ver replaces="" m
  shift
  gomod="$(module_gomod k8s.io/kubernetes "${K8S_VERSION}")"
  goline="$(grep -m1 '^go ' "${gomod}")"
  godebug="$(grep '^godebug ' "${gomod}" || true)" # e.g. `godebug default=go1.25`
  staging_ver="v0.${K8S_VERSION#v1.}"
  for m in $(sed -n 's/^[[:space:]]*\(k8s\.io\/[^ ]*\) => \.\/staging\/.*/\1/p' "${gomod}"); do
    replaces+="	${m} => ${m} ${staging_ver}"$'\n'
  done
  if [[ -z "${replaces}" ]]; then
    echo "no staging replace directives found in ${gomod}" >&2
    exit 1
  fi
  make_wrapper "${dir}" "${goline}"$'\n'"${godebug}" \
    "	k8s.io/kubernetes ${K8S_VERSION}" "${replaces%$'\n'}" "$@"
}

# k8s_ldflags -> -ldflags value for k8s.io/kubernetes binaries: the same
# version stamping as hack/lib/version.sh, so `--version`, /version and
# client-side skew checks (kubectl, helm kubeVersion) see a real version.
k8s_ldflags() {
  local minor="${K8S_VERSION#v1.}"
  minor="${minor%%.*}"
  local ld="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X ${p}.gitVersion=${K8S_VERSION} -X ${p}.gitMajor=1 -X ${p}.gitMinor=${minor}"
    ld+=" -X ${p}.gitTreeState=clean -X ${p}.buildDate=${FIXED_DATE}"
  done
  echo "${ld}"
}

step() { # step NAME SECONDS
  TIMINGS+=("$(printf '%-28s %5ss' "$1" "$2")")
  echo ">>> $1 done in $2s"
}

print_timings() {
  echo
  echo "=== timings"
  if ((${#TIMINGS[@]})); then printf '%s\n' "${TIMINGS[@]}"; else echo "(nothing built)"; fi
  echo "total: $((SECONDS - SCRIPT_START))s"
}

# build_k8s_cmds WRAPPER_DIR LABEL CMD... -> k8s.io/kubernetes/cmd/<CMD> at K8S_VERSION into
# BIN, skipped when every one is up to date. One `go build` for all of them, so their
# (large) shared package graph is compiled once.
build_k8s_cmds() {
  local dir="$1" label="$2" t=$SECONDS c missing=0
  shift 2
  for c in "$@"; do up_to_date "$c" "${K8S_VERSION}" || missing=1; done
  if [[ $missing == 0 ]]; then
    echo ">>> ${label} ${K8S_VERSION}: up to date, skipping"
    return
  fi
  echo ">>> building $* ${K8S_VERSION}"
  local pkgs=() ld
  for c in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/${c}"); done
  k8s_wrapper "${dir}" "${pkgs[@]}"
  ld="$(k8s_ldflags)"
  local tmp="${BIN}/.$(basename "${dir}")-build"
  rm -rf "${tmp}" && mkdir -p "${tmp}"
  (cd "${dir}" && go build "${BUILD_FLAGS[@]}" -ldflags="${ld}" -o "${tmp}/" "${pkgs[@]}")
  for c in "$@"; do
    mv -f "${tmp}/${c}" "${BIN}/${c}"
    stamp "${c}" "${K8S_VERSION}"
  done
  rmdir "${tmp}"
  step "${label} ${K8S_VERSION} ($# bins)" $((SECONDS - t))
}
