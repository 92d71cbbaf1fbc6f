#!/usr/bin/env bash
# Install the Prometheus server binary that the observability tests and
# scripts/draw-dashboards.py run as a child process (tests/prometheus.py),
# idempotently: nothing happens when `prometheus` is already on PATH.
#
# Only the binary is wanted. The Debian package's postinst starts a system
# service (sysvinit script or systemd unit) listening on :9090 with its own
# config and data; the tests never use it, and a forgotten daemon scraping
# nothing is only a nuisance, so a service this script's install started is
# stopped and disabled again. A Prometheus that was installed before is left
# alone: then this script does nothing at all.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

if command -v prometheus >/dev/null; then
  exit 0
fi

echo "install-prometheus: installing the Debian package prometheus"
$SUDO apt-get update -qq
# Recommends would add prometheus-node-exporter, another daemon we do not need.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  prometheus >/dev/null

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
elif [ -x /etc/init.d/prometheus ]; then
  # --oknodo in the init script: stopping a daemon that never started (a
  # container's policy-rc.d forbids starts) succeeds too.
  $SUDO /etc/init.d/prometheus stop >/dev/null
  if command -v update-rc.d >/dev/null; then
    $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
fi

command -v prometheus >/dev/null || {
  echo "install-prometheus: the package installed but prometheus is not on PATH" >&2
  exit 1
}
echo "install-prometheus: ready ($(prometheus --version 2>&1 | sed -n 1p))"
