#!/usr/bin/env bash
# Prints the path of a minimal Debian 12 root file system as a tarball (debootstrap minbase with
# adduser and init-system-helpers for the packages' maintainer scripts, python3 and python3-apt
# for Ansible's modules), made once and cached outside the clone (about a minute, 80 MB). The
# packaging and Ansible tests unpack it into scratch folders and use them as hosts, through
# chroot (dpkg, and Ansible's chroot connection).
#
# With --systemd: the same root with systemd as its init, D-Bus and sudo (made from the first in
# a few seconds, 110 MB), for the test that boots it with systemd-nspawn and runs
# docs/install.md's lines on it, systemctl included.
set -euo pipefail
cache=${ACTIDASH_CACHE:-$HOME/.cache/actidash}
tarball=$cache/debian-bookworm-minbase-v2.tar.gz
if [ ! -s "$tarball" ]; then
  if ! command -v debootstrap >/dev/null 2>&1; then
    apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends debootstrap >&2
  fi
  mkdir -p "$cache"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  debootstrap --variant=minbase --include=adduser,init-system-helpers,python3,python3-apt bookworm "$work/root" \
    http://deb.debian.org/debian >&2
  rm -rf "$work/root/var/cache/apt/archives/"*.deb
  tar -C "$work/root" --numeric-owner -czf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
if [ "${1:-}" = "--systemd" ]; then
  booting=$cache/debian-bookworm-systemd-v1.tar.gz
  if [ ! -s "$booting" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mkdir "$work/root"
    tar -C "$work/root" -xzf "$tarball"
    cp /etc/resolv.conf "$work/root/etc/resolv.conf"
    chroot "$work/root" env DEBIAN_FRONTEND=noninteractive sh -c \
      'apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd systemd-sysv dbus sudo >/dev/null'
    rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
    : >"$work/root/etc/resolv.conf"
    # A machine id of its own is made at each boot.
    : >"$work/root/etc/machine-id"
    tar -C "$work/root" --numeric-owner -czf "$booting.tmp" .
    mv "$booting.tmp" "$booting"
  fi
  tarball=$booting
fi
echo "$tarball"
