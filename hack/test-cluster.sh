#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, for the operator and Helm tests.
#
#   hack/test-cluster.sh build   build (once, cached) etcd, kube-apiserver, kube-controller-manager, kubectl
#   hack/test-cluster.sh up      start them; writes .test-cluster/kubeconfig
#   hack/test-cluster.sh down    stop them
#
# If a kind cluster exists (and FEDJOB_NO_KIND is unset) it is used instead.
# No registry ships these binaries, so they are built offline from Debian
# bookworm's `kubernetes` source package (v1.20.2) with Debian's Go 1.19, as
# ../shared/ENVIRONMENT.md describes. Binaries are cached in
# $FEDJOB_CACHE/k8s (default ~/.cache/fedjob/k8s). If KUBEBUILDER_ASSETS points
# at envtest binaries (etcd, kube-apiserver, kubectl) they are used instead.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${FEDJOB_CACHE:-$HOME/.cache/fedjob}/k8s
BIN=$CACHE/bin
WORK=$CACHE/work
STATE=${TEST_CLUSTER_DIR:-$ROOT/.test-cluster}
K8S_VERSION=v1.20.2
# shellcheck source=hack/lib/apt.sh
. "$ROOT/hack/lib/apt.sh"

log() { echo "test-cluster: $*" >&2; }

# Bump when the build recipe changes, so cached binaries are rebuilt.
RECIPE=2

have_binaries() {
  [ -x "$BIN/etcd" ] && [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kubectl" ] && [ -x "$BIN/kube-controller-manager" ] \
    && [ "$(cat "$BIN/.recipe" 2>/dev/null)" = "$RECIPE" ]
}

apt_work() { apt_private "$WORK/apt" "$@"; }

build() {
  if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ]; then
    log "using envtest binaries in $KUBEBUILDER_ASSETS"; return
  fi
  if have_binaries; then log "binaries cached in $BIN"; return; fi
  local start=$SECONDS
  mkdir -p "$WORK/src" "$WORK/debs" "$WORK/root" "$BIN"
  log "fetching Debian sources and packages (from this machine's package sources)"
  private_sources "$WORK/apt"
  apt_work update >/dev/null
  (cd "$WORK/src" && apt_work source --download-only kubernetes >/dev/null)
  (cd "$WORK/debs" && apt_work download golang-1.19-go golang-1.19-src etcd-server kubernetes-client \
      golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev >/dev/null)
  for deb in "$WORK"/debs/*.deb; do dpkg -x "$deb" "$WORK/root"; done
  cp "$WORK/root/usr/bin/etcd" "$BIN/etcd"
  cp "$WORK/root/usr/bin/kubectl" "$BIN/kubectl"

  local gopath=$WORK/gopath
  local src=$gopath/src/k8s.io/kubernetes
  rm -rf "$gopath" && mkdir -p "$gopath/src/k8s.io"
  tar xzf "$WORK"/src/kubernetes_*.orig.tar.gz -C "$gopath/src/k8s.io"
  mv "$gopath"/src/k8s.io/kubernetes-* "$src"
  # reflect2 1.0.1 crashes under Go >= 1.18 at the first custom-resource create.
  for pkg in github.com/modern-go/reflect2 github.com/json-iterator/go; do
    rm -rf "${src:?}/vendor/$pkg" && cp -r "$WORK/root/usr/share/gocode/src/$pkg" "$src/vendor/$pkg"
  done

  export GOROOT=$WORK/root/usr/lib/go-1.19 GOPATH=$gopath GO111MODULE=off GOPROXY=off CGO_ENABLED=0
  export GOCACHE=$CACHE/gocache GOFLAGS=
  local go=$GOROOT/bin/go
  cd "$src"
  log "generating pkg/generated/openapi (missing from the release tarball)"
  "$go" build -o "$WORK/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  local dirs
  dirs=$(find -L pkg cmd plugin vendor/k8s.io -name '*.go' -not -path '*/testdata/*' \
           -not -path 'vendor/k8s.io/code-generator/*' -not -path 'vendor/k8s.io/sample-apiserver/*' \
           -print0 | xargs -0 grep -l '^// *+k8s:openapi-gen=' | xargs -n1 dirname | LC_ALL=C sort -u \
           | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)
  "$WORK/openapi-gen" --logtostderr -i "$dirs" -p k8s.io/kubernetes/pkg/generated/openapi \
    -O zz_generated.openapi -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r /dev/null
  # The same version stamps upstream's hack/lib/version.sh sets (the /version endpoint reads client-go's).
  local ldflags="-s -w" v
  for v in k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version k8s.io/kubernetes/vendor/k8s.io/component-base/version; do
    ldflags+=" -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=20 -X $v.gitTreeState=clean"
  done
  for cmd in kube-apiserver kube-controller-manager; do
    log "building $cmd"
    "$go" build -ldflags "$ldflags" -o "$BIN/$cmd" "./cmd/$cmd"
  done
  echo "$RECIPE" > "$BIN/.recipe"
  log "built in $((SECONDS - start)) s; binaries in $BIN"
}

bins() {
  if [ -f "$STATE/kind" ]; then dirname "$(command -v kubectl)"; return; fi
  if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ]; then echo "$KUBEBUILDER_ASSETS"; else echo "$BIN"; fi
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_for() {
  local what=$1; shift
  for _ in $(seq 1 120); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  log "$what did not become ready; see $STATE/*.log"; return 1
}

use_kind() {
  # An existing kind cluster: use it instead of building one. The operator's
  # RBAC identity is a real ServiceAccount token there.
  command -v kind >/dev/null 2>&1 || return 1
  local name; name=$(kind get clusters 2>/dev/null | head -n 1)
  [ -n "$name" ] || return 1
  mkdir -p "$STATE"
  kind get kubeconfig --name "$name" > "$STATE/kubeconfig"
  local k=(kubectl --kubeconfig "$STATE/kubeconfig")
  "${k[@]}" create namespace fedjob --dry-run=client -o yaml | "${k[@]}" apply -f - >/dev/null
  "${k[@]}" -n fedjob create serviceaccount fedjob-operator --dry-run=client -o yaml | "${k[@]}" apply -f - >/dev/null
  local token; token=$("${k[@]}" -n fedjob create token fedjob-operator --duration 24h)
  cp "$STATE/kubeconfig" "$STATE/operator.kubeconfig"
  kubectl --kubeconfig "$STATE/operator.kubeconfig" config set-credentials operator --token="$token" >/dev/null
  kubectl --kubeconfig "$STATE/operator.kubeconfig" config set-context --current --user=operator >/dev/null
  echo "$name" > "$STATE/kind"
  log "using kind cluster $name"
}

up() {
  if [ -z "${FEDJOB_NO_KIND:-}" ] && use_kind; then return; fi
  if [ -f "$STATE/kubeconfig" ] && "$(bins)/kubectl" --kubeconfig "$STATE/kubeconfig" get --raw /readyz >/dev/null 2>&1; then
    log "already running ($STATE/kubeconfig)"; return
  fi
  build
  down >/dev/null 2>&1 || true
  local b; b=$(bins)
  local start=$SECONDS
  mkdir -p "$STATE"
  local etcd_port peer_port api_port
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
  openssl genrsa -out "$STATE/sa.key" 2048 2>/dev/null
  openssl rsa -in "$STATE/sa.key" -pubout -out "$STATE/sa.pub" 2>/dev/null
  local token; token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
  local op_token; op_token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
  # The operator's identity, as its in-cluster ServiceAccount would be named: RBAC
  # tests bind operator/rbac.yaml to it and nothing else.
  {
    echo "$token,admin,admin,system:masters"
    echo "$op_token,system:serviceaccount:fedjob:fedjob-operator,fedjob-operator,\"system:serviceaccounts,system:serviceaccounts:fedjob,system:authenticated\""
  } > "$STATE/tokens.csv"
  "$b/etcd" --data-dir "$STATE/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "default=http://127.0.0.1:$peer_port" > "$STATE/etcd.log" 2>&1 &
  echo $! > "$STATE/etcd.pid"
  "$b/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" --bind-address 127.0.0.1 \
    --secure-port "$api_port" --cert-dir "$STATE/pki" --token-auth-file "$STATE/tokens.csv" \
    --authorization-mode RBAC --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$STATE/sa.pub" --service-account-signing-key-file "$STATE/sa.key" \
    --service-cluster-ip-range 10.96.0.0/24 --endpoint-reconciler-type none \
    --disable-admission-plugins ServiceAccount --allow-privileged=true > "$STATE/apiserver.log" 2>&1 &
  echo $! > "$STATE/apiserver.pid"
  cat > "$STATE/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$STATE/pki/apiserver.crt"}
users:
- name: admin
  user: {token: "$token"}
contexts:
- name: test
  context: {cluster: test, user: admin, namespace: default}
current-context: test
KC
  sed -e "s/token: \"$token\"/token: \"$op_token\"/" -e "s/name: admin/name: operator/" \
      -e "s/user: admin/user: operator/" "$STATE/kubeconfig" > "$STATE/operator.kubeconfig"
  wait_for kube-apiserver "$b/kubectl" --kubeconfig "$STATE/kubeconfig" get --raw /readyz
  "$b/kube-controller-manager" --kubeconfig "$STATE/kubeconfig" --bind-address 127.0.0.1 --secure-port 0 \
    --port 0 --controllers 'garbagecollector,serviceaccount,deployment,replicaset,job,namespace,pvc-protection' \
    --use-service-account-credentials=false --leader-elect=false > "$STATE/controller-manager.log" 2>&1 &
  echo $! > "$STATE/controller-manager.pid"
  log "ready in $((SECONDS - start)) s: export KUBECONFIG=$STATE/kubeconfig"
}

down() {
  for name in controller-manager apiserver etcd; do
    if [ -f "$STATE/$name.pid" ]; then
      kill "$(cat "$STATE/$name.pid")" 2>/dev/null || true
      rm -f "$STATE/$name.pid"
    fi
  done
  sleep 0.5
  rm -rf "$STATE/etcd" "$STATE/kubeconfig" "$STATE/operator.kubeconfig" "$STATE/kind"
}

case "${1:-}" in
  build) build ;;
  up) up ;;
  down) down ;;
  bin) bins ;;
  *) echo "usage: $0 build|up|down|bin" >&2; exit 2 ;;
esac
