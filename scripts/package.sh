#!/usr/bin/env bash
# Builds the installable packages of ActiDash into an output folder:
#   actidash-agent_<version>_<arch>.deb    the edge agent (edge-agent, its unit, /etc/actidash/agent.toml)
#   actidash-cloud_<version>_<arch>.deb    the cloud side (cloud-aggregator, its units, cloud.toml, the dashboards)
#   actidash-agent-<version>-1.<arch>.rpm, actidash-cloud-<version>-1.<arch>.rpm   the same for RPM hosts
#   actidash-<version>-linux-<arch>.tar.gz  both binaries, units, configurations and install.sh
#
#   scripts/package.sh [--out DIR] [--version V] [--profile release|dev] [--no-build] [--no-rpm]
#
# --profile dev packages the debug build the test suite already made (the packaging tests use
# it: what is tested is the layout and the maintainer scripts, not the optimizer); releases use
# the default, release. Binaries are stripped. The .deb are built with dpkg-deb, the .rpm with
# rpmbuild (Debian's `rpm` package), from the same staged tree.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/target/packages"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)"
profile=release
build=yes
rpm=yes
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --version) version="$2"; shift 2 ;;
        --profile) profile="$2"; shift 2 ;;
        --no-build) build=no; shift ;;
        --no-rpm) rpm=no; shift ;;
        *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$profile" in
    release) profile_dir=release; cargo_profile=(--release) ;;
    dev) profile_dir=debug; cargo_profile=() ;;
    *) echo "package.sh: --profile is release or dev" >&2; exit 2 ;;
esac
target_dir="${CARGO_TARGET_DIR:-$root/target}"
bin_dir="$target_dir/$profile_dir"
arch="$(dpkg --print-architecture)"
rpm_arch="$(uname -m)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

if [ "$build" = yes ]; then
    cargo build "${cargo_profile[@]}" --manifest-path "$root/Cargo.toml" -p edge-agent -p cloud-aggregator --bins
fi
for b in edge-agent cloud-aggregator; do
    [ -x "$bin_dir/$b" ] || { echo "package.sh: $bin_dir/$b is missing (build it, or drop --no-build)" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Man pages and shell completions come from the binaries themselves (clap).
docs() {
    local name="$1" tree="$2"
    install -d "$tree/usr/share/man/man1" "$tree/usr/share/bash-completion/completions" \
        "$tree/usr/share/zsh/vendor-completions" "$tree/usr/share/fish/vendor_completions.d"
    "$tree/usr/bin/$name" manual >"$tree/usr/share/man/man1/$name.1"
    gzip -9n "$tree/usr/share/man/man1/$name.1"
    "$tree/usr/bin/$name" completions bash >"$tree/usr/share/bash-completion/completions/$name"
    "$tree/usr/bin/$name" completions zsh >"$tree/usr/share/zsh/vendor-completions/_$name"
    "$tree/usr/bin/$name" completions fish >"$tree/usr/share/fish/vendor_completions.d/$name.fish"
}

# stage PACKAGE BINARY CONFIG UNITS...: the installed tree of one package.
stage() {
    local package="$1" binary="$2" config="$3"
    shift 3
    local tree="$work/$package"
    install -d "$tree/usr/bin" "$tree/etc/actidash" "$tree/lib/systemd/system" "$tree/usr/share/doc/$package" \
        "$tree/usr/share/lintian/overrides"
    install -m 0755 "$bin_dir/$binary" "$tree/usr/bin/$binary"
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$tree/usr/bin/$binary"
    install -m 0644 "$root/installers/config/$config" "$tree/etc/actidash/$config"
    for unit in "$@"; do
        install -m 0644 "$root/installers/systemd/$unit" "$tree/lib/systemd/system/$unit"
    done
    install -m 0644 "$root/installers/copyright" "$tree/usr/share/doc/$package/copyright"
    install -m 0644 "$root/README.md" "$tree/usr/share/doc/$package/README.md"
    sed "s/@PACKAGE@/$package/g; s/@VERSION@/$version/g; s/@DATE@/$(date -R -d @"${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)}")/" \
        "$root/installers/deb/changelog" | gzip -9n >"$tree/usr/share/doc/$package/changelog.gz"
    install -m 0644 "$root/installers/deb/$package.lintian-overrides" "$tree/usr/share/lintian/overrides/$package"
    docs "$binary" "$tree"
}

stage actidash-agent edge-agent agent.toml actidash-agent.service
stage actidash-cloud cloud-aggregator cloud.toml actidash-cloud.service actidash-cloud@.service
if [ -d "$root/desktop/ui/dist" ]; then
    install -d "$work/actidash-cloud/usr/share/actidash"
    cp -r "$root/desktop/ui/dist" "$work/actidash-cloud/usr/share/actidash/ui"
    find "$work/actidash-cloud/usr/share/actidash" -type d -exec chmod 0755 {} + -o -type f -exec chmod 0644 {} +
else
    echo "package.sh: desktop/ui/dist not built (scripts/ui.sh build): the cloud package has no dashboards" >&2
fi

# deb PACKAGE CONFIG MAIN_UNIT UNITS ENABLE SUMMARY DESCRIPTION
deb() {
    local package="$1" config="$2" main_unit="$3" units="$4" enable="$5" summary="$6" description="$7"
    local tree="$work/$package"
    install -d "$tree/DEBIAN"
    for script in postinst prerm postrm; do
        sed "s/@PACKAGE@/$package/g; s/@CONFIG@/$config/g; s/@MAIN_UNIT@/$main_unit/g; s/@UNITS@/$units/g; s/@ENABLE@/$enable/g" \
            "$root/installers/deb/$script" >"$tree/DEBIAN/$script"
        chmod 0755 "$tree/DEBIAN/$script"
    done
    echo "/etc/actidash/$config" >"$tree/DEBIAN/conffiles"
    local size
    size="$(du -sk --exclude=DEBIAN "$tree" | cut -f1)"
    cat >"$tree/DEBIAN/control" <<EOF
Package: $package
Version: $version
Architecture: $arch
Maintainer: ActiDash <packages@actidash.example>
Installed-Size: $size
Depends: adduser, libc6 (>= 2.34), libgcc-s1
Section: net
Priority: optional
Homepage: https://actidash.example
Description: $summary
$(echo "$description" | fold -s -w 78 | sed 's/^/ /; s/ *$//')
EOF
    (cd "$tree" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum >DEBIAN/md5sums)
    dpkg-deb --root-owner-group -Zxz --build "$tree" "$out/${package}_${version}_${arch}.deb" >/dev/null
    echo "$out/${package}_${version}_${arch}.deb"
}

deb actidash-agent agent.toml actidash-agent.service actidash-agent.service yes \
    "ActiDash edge agent: on-prem data to live analytics" \
    "Tails on-prem sources (logs, JSON lines, CSV exports, PostgreSQL, MySQL/MariaDB and SQLite tables) without modifying them, maps their records to typed e-commerce events, keeps them in a durable local spool through outages and ships them authenticated over QUIC to the ActiDash cloud."
deb actidash-cloud cloud.toml actidash-cloud.service "actidash-cloud.service actidash-cloud@.service" no \
    "ActiDash cloud side: gateway, processors and API" \
    "Receives the events of ActiDash agents over QUIC, writes them to Kafka (or processes them in-process), computes sales, sessions, funnels, attribution and inventory metrics exactly once, and serves them over an HTTP API with live push and the dashboards."

if [ "$rpm" = yes ]; then
    if ! command -v rpmbuild >/dev/null; then
        echo "package.sh: rpmbuild not found (Debian's rpm package); --no-rpm to skip" >&2
        exit 1
    fi
    for package in actidash-agent actidash-cloud; do
        case "$package" in
            actidash-agent) config=agent.toml; units="actidash-agent.service" ;;
            actidash-cloud) config=cloud.toml; units="actidash-cloud.service actidash-cloud@.service" ;;
        esac
        rpm_top="$work/rpm-$package"
        install -d "$rpm_top/SPECS" "$rpm_top/RPMS" "$rpm_top/BUILD"
        # Listed by the spec itself: the configuration (noreplace) and the units (moved to /usr/lib).
        files="$(cd "$work/$package" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -path ./lib -prune \
            -o -path ./usr/share/lintian -prune -o -type f -printf '/%P\n' | sort)"
        sed "s/@PACKAGE@/$package/g; s/@VERSION@/$version/g; s/@CONFIG@/$config/g; s/@UNITS@/$units/g" \
            "$root/installers/rpm/actidash.spec.in" >"$rpm_top/SPECS/$package.spec"
        printf '%s\n' "$files" >>"$rpm_top/SPECS/$package.spec"
        # Debian's rpm runs its post-install scripts with dash, which they do not expect; the tree
        # is final already (stripped, man pages compressed).
        rpmbuild --quiet -bb --define "_topdir $rpm_top" --define "_build_id_links none" --define "__os_install_post %{nil}" \
            --define "stage $work/$package" --target "$rpm_arch" "$rpm_top/SPECS/$package.spec"
        find "$rpm_top/RPMS" -name '*.rpm' -exec cp {} "$out/" \;
        echo "$out/$package-$version-1.$rpm_arch.rpm"
    done
fi

# The tarball: both trees and an installer for hosts without dpkg or rpm.
tar_root="$work/actidash-$version"
install -d "$tar_root"
cp -a "$work/actidash-agent/usr" "$work/actidash-agent/etc" "$work/actidash-agent/lib" "$tar_root/"
cp -a "$work/actidash-cloud/usr" "$work/actidash-cloud/etc" "$work/actidash-cloud/lib" "$tar_root/"
rm -rf "$tar_root/usr/share/lintian"
install -m 0755 "$root/installers/tarball/install.sh" "$tar_root/install.sh"
tar -C "$work" --owner=0 --group=0 --numeric-owner -czf "$out/actidash-$version-linux-$rpm_arch.tar.gz" "actidash-$version"
echo "$out/actidash-$version-linux-$rpm_arch.tar.gz"
