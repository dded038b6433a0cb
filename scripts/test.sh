#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs and starts what the tests need (Apache
# Kafka in KRaft mode; PostgreSQL and MariaDB from Debian's packages), then runs fmt, clippy and
# every test, and stops the services again.
# This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Builds are cached outside the clone, so that CI runs on this machine reuse them; a fresh
# machine builds from scratch.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/actidash/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
export ACTIDASH_REQUIRE_SERVICES=1

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
cargo --version
rustc --version

step "cargo fmt --check"
cargo fmt --all -- --check

step "the desktop app's system libraries (WebKitGTK 4.1), Xvfb for its test"
eval "$(scripts/ui.sh desktop)"

step "build the dashboards (npm ci, type check, vite; the desktop app ships them) and install Debian's chromium for the browser test"
scripts/ui.sh build
eval "$(scripts/ui.sh chromium)"
echo "ACTIDASH_CHROMIUM=$ACTIDASH_CHROMIUM"

step "Prometheus's promtool (Debian's prometheus), for the metrics and alert-rule tests"
if ! command -v promtool >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
ACTIDASH_PROMTOOL=$(command -v promtool)
export ACTIDASH_PROMTOOL
promtool --version | sed -n 1p

step "tmux (Debian's), for the test of the agent's live status view"
if ! command -v tmux >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends tmux >/dev/null
fi
ACTIDASH_TMUX=$(command -v tmux)
export ACTIDASH_TMUX

step "systemd-analyze (Debian's systemd), for the checks of the systemd units"
if ! command -v systemd-analyze >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
ACTIDASH_SYSTEMD_ANALYZE=$(command -v systemd-analyze)
export ACTIDASH_SYSTEMD_ANALYZE

step "packaging tools (Debian's lintian, rpm, debootstrap, systemd-nspawn, buildah) and Debian roots for the install tests"
missing=""
for tool in lintian:lintian rpmbuild:rpm debootstrap:debootstrap systemd-nspawn:systemd-container buildah:buildah; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing="$missing ${tool#*:}"
done
if [ -n "$missing" ]; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
ACTIDASH_DEBIAN_ROOT=$(scripts/debian-root.sh)
export ACTIDASH_DEBIAN_ROOT
echo "ACTIDASH_DEBIAN_ROOT=$ACTIDASH_DEBIAN_ROOT"
ACTIDASH_BUILDAH=$(command -v buildah)
export ACTIDASH_BUILDAH
ACTIDASH_DEBIAN_SYSTEMD_ROOT=$(scripts/debian-root.sh --systemd)
export ACTIDASH_DEBIAN_SYSTEMD_ROOT
echo "ACTIDASH_DEBIAN_SYSTEMD_ROOT=$ACTIDASH_DEBIAN_SYSTEMD_ROOT"

step "Ansible, ansible-lint and kubernetes-validate (PyPI, in a virtual environment outside the clone)"
venv=${ACTIDASH_CACHE:-$HOME/.cache/actidash}/ansible-venv
if [ ! -x "$venv/bin/ansible-lint" ] || [ ! -x "$venv/bin/ansible-playbook" ] || [ ! -x "$venv/bin/kubernetes-validate" ]; then
  if ! python3 -c 'import ensurepip' 2>/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q ansible==12.3.0 ansible-core==2.19.14 ansible-lint==26.10.1 kubernetes-validate==1.37.0
fi
ACTIDASH_ANSIBLE=$venv/bin
export ACTIDASH_ANSIBLE
"$venv/bin/ansible-playbook" --version | sed -n 1p

step "kustomize (Go module proxy, built once outside the clone) for the Kubernetes manifests' test"
gobin=${ACTIDASH_CACHE:-$HOME/.cache/actidash}/go-bin
if [ ! -x "$gobin/kustomize" ]; then
  go=$(command -v go || echo /usr/local/go/bin/go)
  GOBIN=$gobin "$go" install sigs.k8s.io/kustomize/kustomize/v5@v5.7.1
fi
ACTIDASH_KUSTOMIZE=$gobin/kustomize
export ACTIDASH_KUSTOMIZE
"$ACTIDASH_KUSTOMIZE" version

step "Kubernetes API server, kubectl and etcd (Go module proxy, built once outside the clone; about 8 minutes the first time)"
k8sbin=$gobin/k8s-$(sha256sum scripts/k8s-tools/go.sum | cut -c1-12)
if [ ! -x "$k8sbin/kube-apiserver" ] || [ ! -x "$k8sbin/kubectl" ] || [ ! -x "$k8sbin/etcd" ]; then
  go=$(command -v go || echo /usr/local/go/bin/go)
  mkdir -p "$k8sbin.tmp"
  (cd scripts/k8s-tools && "$go" build -trimpath -o "$k8sbin.tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl go.etcd.io/etcd/server/v3)
  mv "$k8sbin.tmp/server" "$k8sbin.tmp/etcd"
  rm -rf "$k8sbin" && mv "$k8sbin.tmp" "$k8sbin"
fi
ACTIDASH_KUBERNETES=$k8sbin
export ACTIDASH_KUBERNETES
ls "$ACTIDASH_KUBERNETES"

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo deny (licences, banned crates, sources)"
if ! command -v cargo-deny >/dev/null 2>&1; then
  cargo install cargo-deny --locked --version 0.20.2
fi
cargo deny --locked check licenses bans sources
# Advisories need the RustSec database from GitHub: checked strictly where it can be reached,
# reported as not checked where it cannot (this workplace's network).
if timeout 20 git ls-remote https://github.com/RustSec/advisory-db HEAD >/dev/null 2>&1; then
  cargo deny --locked check advisories
else
  echo "NOTE: advisories NOT checked: the RustSec database (github.com) is unreachable from here" >&2
fi

step "build the binaries the end-to-end tests run"
cargo build --workspace --bins --locked


step "start Apache Kafka (KRaft, 1 broker; and a 3-broker cluster for failover tests)"
cache=${ACTIDASH_CACHE:-$HOME/.cache/actidash}
export ACTIDASH_KAFKA3_DIR=$cache/kafka3-run
kafka3() { ACTIDASH_KAFKA_DIR=$ACTIDASH_KAFKA3_DIR ACTIDASH_KAFKA_PORT=29092 scripts/kafka.sh "$@"; }
trap 'scripts/kafka.sh stop || true; kafka3 stop || true; scripts/db.sh stop || true' EXIT
eval "$(scripts/kafka.sh start 1)"
echo "ACTIDASH_KAFKA_BOOTSTRAP=$ACTIDASH_KAFKA_BOOTSTRAP"
ACTIDASH_KAFKA3_BOOTSTRAP=$(kafka3 start 3 | sed -n 's/^export ACTIDASH_KAFKA_BOOTSTRAP=//p')
export ACTIDASH_KAFKA3_BOOTSTRAP
echo "ACTIDASH_KAFKA3_BOOTSTRAP=$ACTIDASH_KAFKA3_BOOTSTRAP (pids in $ACTIDASH_KAFKA3_DIR/broker-*/pid)"

step "Groovy's compiler (Maven Central), to check the Jenkinsfile's syntax offline"
mvn -q -B dependency:get -Dartifact=org.apache.groovy:groovy:4.0.33 >/dev/null
ACTIDASH_GROOVY_JAR=$HOME/.m2/repository/org/apache/groovy/groovy/4.0.33/groovy-4.0.33.jar
export ACTIDASH_GROOVY_JAR
ls -l "$ACTIDASH_GROOVY_JAR"

step "start PostgreSQL and MariaDB"
eval "$(scripts/db.sh start)"
echo "ACTIDASH_PG_URL=$ACTIDASH_PG_URL"

step "cargo test"
status=0
cargo test --workspace --locked -- --test-threads=2 || status=$?
if [ $status -ne 0 ]; then
  step "logs of the end-to-end tests' processes"
  for log in "$CARGO_TARGET_DIR"/tmp/e2e/*/deploy/*.log; do
    [ -f "$log" ] || continue
    echo "--- $log (last 40 lines)"
    tail -40 "$log"
  done
fi
exit $status
