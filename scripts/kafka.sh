#!/usr/bin/env bash
# Apache Kafka in KRaft mode for ActiDash's tests: fetches the broker jars from Maven Central
# (into a cache outside the clone), and starts or stops one broker or a three-broker cluster on
# 127.0.0.1, using the machine's Java 17.
#
#   scripts/kafka.sh start [1|3]   start (default: 1 broker); prints `export ACTIDASH_KAFKA_BOOTSTRAP=...`
#   scripts/kafka.sh stop          stop every broker this script started
#   scripts/kafka.sh fetch         only fetch the jars
#
# Environment: ACTIDASH_CACHE (default ~/.cache/actidash), ACTIDASH_KAFKA_DIR (runtime folder,
# default $ACTIDASH_CACHE/kafka-run), ACTIDASH_KAFKA_PORT (first broker port, default 19092).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${ACTIDASH_CACHE:-$HOME/.cache/actidash}
version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/kafka/pom.xml")
libs=$cache/kafka-$version/libs
run=${ACTIDASH_KAFKA_DIR:-$cache/kafka-run}
base_port=${ACTIDASH_KAFKA_PORT:-19092}

log() { echo "kafka.sh: $*" >&2; }

need_java() {
  if ! command -v java >/dev/null 2>&1; then
    log "installing Java 17 (Debian's openjdk-17-jre-headless)"
    apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null
  fi
  if ! command -v mvn >/dev/null 2>&1; then
    log "installing Maven (Debian's maven)"
    apt-get update -qq && apt-get install -y -qq maven >/dev/null
  fi
}

fetch() {
  if [ -f "$libs/.complete" ]; then return; fi
  need_java
  log "fetching Kafka $version jars from Maven Central into $libs"
  rm -rf "$libs"
  mvn -q -B -f "$here/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$libs" >&2
  touch "$libs/.complete"
}

write_config() { # node_id n_brokers
  local id=$1 n=$2 dir=$run/broker-$1
  local port=$((base_port + (id - 1) * 2)) voters="" i
  for i in $(seq 1 "$n"); do
    voters+="${voters:+,}$i@127.0.0.1:$((base_port + (i - 1) * 2 + 1))"
  done
  mkdir -p "$dir"
  local rf=$(( n >= 3 ? 3 : 1 )) isr=$(( n >= 3 ? 2 : 1 ))
  cat > "$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=$id
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$((port + 1))
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=3
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
min.insync.replicas=$isr
default.replication.factor=$rf
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
EOF
  cat > "$dir/log4j2.properties" <<'EOF'
status = error
appender.file.type = Console
appender.file.name = OUT
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = OUT
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = info
EOF
}

start() {
  local n=${1:-1}
  fetch
  need_java
  stop_all quiet
  rm -rf "$run"
  mkdir -p "$run"
  local cp="$libs/*" cluster_id
  cluster_id=$(java -cp "$cp" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)
  local id bootstrap=""
  for id in $(seq 1 "$n"); do
    write_config "$id" "$n"
    java -cp "$cp" kafka.tools.StorageTool format -t "$cluster_id" -c "$run/broker-$id/server.properties" >/dev/null 2>&1
    local port=$((base_port + (id - 1) * 2))
    bootstrap+="${bootstrap:+,}127.0.0.1:$port"
    nohup java -Xms256m -Xmx512m -XX:+UseG1GC \
      -Dlog4j2.configurationFile="$run/broker-$id/log4j2.properties" \
      -cp "$cp" kafka.Kafka "$run/broker-$id/server.properties" \
      > "$run/broker-$id/broker.log" 2>&1 &
    echo $! > "$run/broker-$id/pid"
  done
  local deadline=$((SECONDS + 90))
  for id in $(seq 1 "$n"); do
    until grep -q "Kafka Server started" "$run/broker-$id/broker.log" 2>/dev/null; do
      if [ $SECONDS -gt $deadline ] || ! kill -0 "$(cat "$run/broker-$id/pid")" 2>/dev/null; then
        log "broker $id did not start; its log:"; tail -50 "$run/broker-$id/broker.log" >&2; exit 1
      fi
      sleep 0.5
    done
  done
  echo "$bootstrap" > "$run/bootstrap"
  log "started $n broker(s): $bootstrap"
  echo "export ACTIDASH_KAFKA_BOOTSTRAP=$bootstrap"
}

stop_all() {
  local pidfile
  for pidfile in "$run"/broker-*/pid; do
    [ -f "$pidfile" ] || continue
    local pid; pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
  [ "${1:-}" = quiet ] || log "stopped"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start "${2:-1}" ;;
  stop) stop_all ;;
  *) echo "usage: $0 fetch | start [1|3] | stop" >&2; exit 2 ;;
esac
