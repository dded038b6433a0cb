#!/usr/bin/env bash
# Runs every benchmark of ../shared/TARGETS.md that ActiDash measures, with a release build and a
# real Kafka broker, and writes the report to docs/BENCHMARKS.md. Not part of the test command:
# figures are measurements, never assertions.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/actidash/target}
export ACTIDASH_LOG=${ACTIDASH_LOG:-warn,edge_agent=info,cloud_aggregator=info}

cargo build --release --workspace --bins --locked
# The rsyslog peer of P2 (imfile -> omkafka), Debian's.
if ! command -v rsyslogd >/dev/null 2>&1 || [ ! -e /usr/lib/x86_64-linux-gnu/rsyslog/omkafka.so ]; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends rsyslog rsyslog-kafka >/dev/null
fi
trap 'scripts/kafka.sh stop || true; scripts/db.sh stop || true' EXIT
eval "$(scripts/kafka.sh start 1)"
eval "$(scripts/db.sh start)"

# The Kafka Streams peer of P4, from Maven Central, built outside the clone.
cache=${ACTIDASH_CACHE:-$HOME/.cache/actidash}
mvn -q -B -f scripts/kafka-streams/pom.xml package dependency:copy-dependencies -Dmaven.test.skip=true \
  -DincludeScope=runtime -DoutputDirectory="$cache/kafka-streams-libs" >&2
export ACTIDASH_KSTREAMS_CP="$cache/kafka-streams-build/kafka-streams-sessions-1.jar:$cache/kafka-streams-libs/*"

bench="$CARGO_TARGET_DIR/release/actidash-bench"
work="$CARGO_TARGET_DIR/bench"
out=docs/BENCHMARKS.md
tmp=$(mktemp)
{
  echo "# Benchmarks"
  echo
  echo "Written by \`scripts/bench.sh\` on $(date -u +%Y-%m-%d) at commit $(git rev-parse --short HEAD)."
  echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(free -g | awk '/Mem:/{print $2}') GiB."
  echo "Kafka $(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' scripts/kafka/pom.xml) in KRaft mode, one broker on 127.0.0.1, on the same machine."
  echo "Each figure stands beside its baseline from the same run; targets are in ../shared/TARGETS.md."
  echo "A 2-core machine is noisy: runs differ by 10-20 %; where a bench runs rounds, it gives the median and the lowest and highest."
  echo "Settings: release build (profile in Cargo.toml), the agent and gateway with their default configuration unless a table says otherwise."
  echo
  "$bench" --dir "$work" hops
  "$bench" --dir "$work" spool
  "$bench" --dir "$work" pipeline --rounds 3
  "$bench" --dir "$work" backlog --events 1000000
  "$bench" --dir "$work" processor
  "$bench" --dir "$work" freshness
  "$bench" --dir "$work" api
  "$bench" --dir "$work" footprint --rounds 3
  "$bench" --dir "$work" reconnect
} > "$tmp"
mv "$tmp" "$out"
cat "$out"
