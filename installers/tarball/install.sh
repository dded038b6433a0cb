#!/bin/sh
# Installs ActiDash from this unpacked tarball on a Linux host without dpkg or rpm:
#   sudo ./install.sh agent     the edge agent (edge-agent, actidash-agent.service)
#   sudo ./install.sh cloud     the cloud side (cloud-aggregator, actidash-cloud*.service)
#   sudo ./install.sh --prefix DIR agent   into DIR instead of / (for a look, or a test)
# A configuration already in /etc/actidash is kept (the new one is written beside it as
# *.new); state in /var/lib/actidash is never touched. Run it again to upgrade.
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
prefix=""
if [ "${1:-}" = --prefix ]; then
    prefix="$2"
    shift 2
fi
what="${1:-}"
case "$what" in
    agent) binary=edge-agent; config=agent.toml; units="actidash-agent.service" ;;
    cloud) binary=cloud-aggregator; config=cloud.toml; units="actidash-cloud.service actidash-cloud@.service" ;;
    *) echo "usage: install.sh [--prefix DIR] agent|cloud" >&2; exit 2 ;;
esac

if [ -z "$prefix" ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (sudo ./install.sh $what)" >&2
    exit 1
fi

install -d "$prefix/usr/bin" "$prefix/etc/actidash" "$prefix/lib/systemd/system" "$prefix/usr/share/man/man1" \
    "$prefix/usr/share/bash-completion/completions"
install -m 0755 "$here/usr/bin/$binary" "$prefix/usr/bin/$binary"
for unit in $units; do
    install -m 0644 "$here/lib/systemd/system/$unit" "$prefix/lib/systemd/system/$unit"
done
install -m 0644 "$here/usr/share/man/man1/$binary.1.gz" "$prefix/usr/share/man/man1/$binary.1.gz"
install -m 0644 "$here/usr/share/bash-completion/completions/$binary" "$prefix/usr/share/bash-completion/completions/$binary"
if [ "$what" = cloud ] && [ -d "$here/usr/share/actidash/ui" ]; then
    install -d "$prefix/usr/share/actidash"
    rm -rf "$prefix/usr/share/actidash/ui"
    cp -r "$here/usr/share/actidash/ui" "$prefix/usr/share/actidash/ui"
fi
if [ -e "$prefix/etc/actidash/$config" ]; then
    if ! cmp -s "$here/etc/actidash/$config" "$prefix/etc/actidash/$config"; then
        install -m 0640 "$here/etc/actidash/$config" "$prefix/etc/actidash/$config.new"
        echo "install.sh: kept your /etc/actidash/$config; the shipped one is $config.new"
    fi
else
    install -m 0640 "$here/etc/actidash/$config" "$prefix/etc/actidash/$config"
fi

if [ -z "$prefix" ]; then
    if ! getent passwd actidash >/dev/null; then
        if command -v useradd >/dev/null; then
            useradd --system --user-group --home-dir /var/lib/actidash --no-create-home --shell /usr/sbin/nologin actidash
        else
            adduser -S -D -H -h /var/lib/actidash -s /sbin/nologin actidash
        fi
    fi
    install -d -o actidash -g actidash -m 0700 /var/lib/actidash
    chgrp actidash /etc/actidash "/etc/actidash/$config"
    chmod 0750 /etc/actidash
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
fi
echo "installed $binary; next: edit /etc/actidash/$config (docs/install.md)"
