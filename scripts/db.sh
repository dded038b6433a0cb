#!/usr/bin/env bash
# PostgreSQL and MariaDB servers for ActiDash's database-source tests, from Debian's packages
# (installed if missing), each in a private folder on 127.0.0.1 so nothing of the machine's own
# servers is touched.
#
#   scripts/db.sh start   install if needed, start both; prints `export ACTIDASH_PG_URL=...`,
#                         `export ACTIDASH_MYSQL_URL=...` (admin URLs the tests set up with) and
#                         `export ACTIDASH_DB_CA=...` (the CA of both servers' TLS certificates)
#   scripts/db.sh stop    stop both
#
# PostgreSQL runs with wal_level=logical (the logical-replication source needs it) and a WAL
# retention cap for slots (max_slot_wal_keep_size), as a production server should have.
# Environment: ACTIDASH_CACHE (default ~/.cache/actidash), ACTIDASH_PG_PORT (default 15432),
# ACTIDASH_MYSQL_PORT (default 13306).
set -euo pipefail

cache=${ACTIDASH_CACHE:-$HOME/.cache/actidash}
run=$cache/db-run
# The postgres user cannot enter root's home: its data folder lives outside it.
pg_dir=${ACTIDASH_PG_DIR:-/var/tmp/actidash-$(id -un)/pg}
pg_port=${ACTIDASH_PG_PORT:-15432}
my_port=${ACTIDASH_MYSQL_PORT:-13306}

log() { echo "db.sh: $*" >&2; }

pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    if [ -x "$d/initdb" ]; then echo "$d"; return; fi
  done
}

install() {
  local want=()
  [ -n "$(pg_bin)" ] || want+=(postgresql)
  command -v mariadbd >/dev/null 2>&1 || want+=(mariadb-server)
  command -v openssl >/dev/null 2>&1 || want+=(openssl)
  if [ ${#want[@]} -gt 0 ]; then
    log "installing ${want[*]} (Debian's packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${want[@]}" >&2
  fi
}

# A test CA and a server certificate for localhost/127.0.0.1, shared by both servers (TLS
# connections from database sources are verified against the CA).
make_tls() {
  local dir=$run/tls
  if [ -f "$dir/server.crt" ]; then return; fi
  mkdir -p "$dir"
  local curve=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${curve[@]}" -days 3650 -subj "/CN=ActiDash test database CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  openssl req "${curve[@]}" -subj "/CN=localhost" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$dir/ext.cnf"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 3650 -extfile "$dir/ext.cnf" -out "$dir/server.crt" 2>/dev/null
  chmod 600 "$dir"/*.key
}

# PostgreSQL refuses to run as root: it runs as the postgres user the package creates.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_pg() {
  local bin dir=$pg_dir
  bin=$(pg_bin)
  if [ ! -f "$dir/PG_VERSION" ]; then
    rm -rf "$dir" && mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
    as_pg "$bin/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 >/dev/null
    cat >> "$dir/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$dir'
wal_level = logical
max_replication_slots = 16
max_wal_senders = 16
max_slot_wal_keep_size = 1GB
fsync = off
EOF
    echo "host all all 127.0.0.1/32 scram-sha-256" > "$dir/pg_hba.conf.new"
    echo "local all all trust" >> "$dir/pg_hba.conf.new"
    # The admin (postgres) connects without a password on loopback; every other role needs one.
    { echo "host all postgres 127.0.0.1/32 trust"; cat "$dir/pg_hba.conf.new"; } > "$dir/pg_hba.conf"
    rm "$dir/pg_hba.conf.new"
    if [ "$(id -u)" = 0 ]; then chown -R postgres: "$dir"; fi
  fi
  if ! grep -q "^ssl = on" "$dir/postgresql.conf"; then
    cp "$run/tls/server.crt" "$run/tls/server.key" "$dir/"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir/server.crt" "$dir/server.key"; fi
    chmod 600 "$dir/server.key"
    printf "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n" >> "$dir/postgresql.conf"
    as_pg "$bin/pg_ctl" -D "$dir" -m fast stop >/dev/null 2>&1 || true
  fi
  if ! as_pg "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    as_pg "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null
  fi
  log "PostgreSQL on 127.0.0.1:$pg_port"
}

start_mysql() {
  local dir=$run/mariadb
  mkdir -p "$dir"
  if [ ! -d "$dir/data/mysql" ]; then
    rm -rf "$dir/data"
    mariadb-install-db --no-defaults --datadir="$dir/data" --user="$(id -un)" \
      --auth-root-authentication-method=normal --skip-test-db >/dev/null
  fi
  if ! mariadb-admin --no-defaults --socket="$dir/mysqld.sock" -uroot ping >/dev/null 2>&1; then
    nohup mariadbd --no-defaults --datadir="$dir/data" --socket="$dir/mysqld.sock" \
      --pid-file="$dir/mysqld.pid" --port="$my_port" --bind-address=127.0.0.1 \
      --user="$(id -un)" --log-error="$dir/server.log" --innodb-flush-log-at-trx-commit=0 \
      --ssl-ca="$run/tls/ca.crt" --ssl-cert="$run/tls/server.crt" --ssl-key="$run/tls/server.key" \
      --skip-name-resolve >/dev/null 2>&1 &
    local i
    for i in $(seq 1 120); do
      if mariadb-admin --no-defaults --socket="$dir/mysqld.sock" -uroot ping >/dev/null 2>&1; then break; fi
      sleep 0.5
    done
    mariadb-admin --no-defaults --socket="$dir/mysqld.sock" -uroot ping >/dev/null
    # The tests' admin user, on loopback TCP.
    mariadb --no-defaults --socket="$dir/mysqld.sock" -uroot -e "
      CREATE USER IF NOT EXISTS 'actidash_admin'@'127.0.0.1' IDENTIFIED BY 'admin-pw';
      GRANT ALL ON *.* TO 'actidash_admin'@'127.0.0.1' WITH GRANT OPTION;"
  fi
  log "MariaDB on 127.0.0.1:$my_port"
}

stop() {
  local bin
  bin=$(pg_bin)
  if [ -n "$bin" ] && [ -f "$pg_dir/PG_VERSION" ]; then
    as_pg "$bin/pg_ctl" -D "$pg_dir" -m fast stop >/dev/null 2>&1 || true
  fi
  if [ -f "$run/mariadb/mysqld.pid" ]; then
    mariadb-admin --no-defaults --socket="$run/mariadb/mysqld.sock" -uroot shutdown >/dev/null 2>&1 \
      || kill "$(cat "$run/mariadb/mysqld.pid")" 2>/dev/null || true
  fi
}

case ${1:-} in
  start)
    install
    mkdir -p "$run"
    make_tls
    start_pg
    start_mysql
    echo "export ACTIDASH_PG_URL=postgres://postgres@127.0.0.1:$pg_port/postgres"
    echo "export ACTIDASH_MYSQL_URL=mysql://actidash_admin:admin-pw@127.0.0.1:$my_port/mysql"
    echo "export ACTIDASH_DB_CA=$run/tls/ca.crt"
    ;;
  stop) stop ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
