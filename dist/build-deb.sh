#!/bin/sh
# Build the Debian package from a release binary with dpkg-deb alone (no cargo-deb, no
# debhelper). `make deb` runs it after `cargo build --release`:
#
#   dist/build-deb.sh BINARY OUTPUT.deb
#
# BINARY is stripped on the way in; the etcd follower, flyproxy-etcd-sync, is taken from the
# same directory. The version comes from Cargo.toml, the architecture from
# `dpkg --print-architecture`, the dependencies from dpkg-shlibdeps (dpkg-dev) when it is there,
# else a fixed list. DEB_MAINTAINER overrides the Maintainer field. Files are owned by root
# whoever builds, and SOURCE_DATE_EPOCH (default: the last commit) fixes every timestamp.
set -eu
umask 022

if [ $# -ne 2 ]; then
    echo "usage: $0 BINARY OUTPUT.deb" >&2
    exit 2
fi
bin=$1
out=$2
top=$(cd "$(dirname "$0")/.." && pwd)
dist=$top/dist

version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$top/Cargo.toml" | head -n 1)
arch=$(dpkg --print-architecture)
maintainer=${DEB_MAINTAINER:-flyproxy maintainers <maintainers@flyproxy.invalid>}
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$top" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH
[ -n "$version" ] || { echo "$0: no version in $top/Cargo.toml" >&2; exit 1; }
[ -x "$bin" ] || { echo "$0: $bin is not an executable" >&2; exit 1; }
sync_bin=$(dirname "$bin")/flyproxy-etcd-sync
[ -x "$sync_bin" ] || { echo "$0: $sync_bin is not an executable" >&2; exit 1; }

mkdir -p "$(dirname "$out")"
outdir=$(cd "$(dirname "$out")" && pwd)
work=$(mktemp -d "$outdir/.build-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
pkg=$work/pkg
doc=$pkg/usr/share/doc/flyproxy

# The files.
install -d "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/etc/flyproxy" "$pkg/etc/default" \
    "$pkg/usr/share/man/man1" "$doc"
install -m 0755 "$bin" "$pkg/usr/bin/flyproxy"
install -m 0755 "$sync_bin" "$pkg/usr/bin/flyproxy-etcd-sync"
strip --strip-unneeded --remove-section=.comment --remove-section=.note \
    "$pkg/usr/bin/flyproxy" "$pkg/usr/bin/flyproxy-etcd-sync"
install -m 0644 "$dist/flyproxy.service" "$dist/flyproxy-bpf.service" \
    "$dist/flyproxy-etcd-sync.service" "$pkg/lib/systemd/system/"
install -m 0644 "$dist/config.json" "$pkg/etc/flyproxy/config.json"
# It may hold etcd credentials (ETCDCTL_PASSWORD): root only.
install -m 0600 "$dist/flyproxy-etcd-sync.default" "$pkg/etc/default/flyproxy-etcd-sync"
gzip -9n < "$dist/flyproxy.1" > "$pkg/usr/share/man/man1/flyproxy.1.gz"
install -m 0644 "$dist/copyright" "$doc/copyright"
# Policy 12.3: documentation over 4 kB is compressed.
gzip -9n < "$top/README.md" > "$doc/README.md.gz"
date_rfc2822=$(date -u -R -d "@$SOURCE_DATE_EPOCH")
printf 'flyproxy (%s) unstable; urgency=medium\n\n  * Built from the flyproxy source tree.\n\n -- %s  %s\n' \
    "$version" "$maintainer" "$date_rfc2822" | gzip -9n > "$doc/changelog.gz"
chmod 0644 "$pkg/usr/share/man/man1/flyproxy.1.gz" "$doc/README.md.gz" "$doc/changelog.gz"

# Dependencies of the binary's shared libraries.
depends="libc6, libelf1, libgcc-s1, zlib1g"
if command -v dpkg-shlibdeps >/dev/null 2>&1; then
    # dpkg-shlibdeps wants a debian/control naming the package; give it a minimal one.
    mkdir -p "$work/src/debian"
    printf 'Source: flyproxy\n\nPackage: flyproxy\nArchitecture: any\n' > "$work/src/debian/control"
    found=$(cd "$work/src" && dpkg-shlibdeps -O "$pkg/usr/bin/flyproxy" \
        "$pkg/usr/bin/flyproxy-etcd-sync" 2>/dev/null |
        sed -n 's/^shlibs:Depends=//p')
    [ -n "$found" ] && depends=$found
fi

installed_size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)

cat > "$pkg/DEBIAN/control" <<EOF
Package: flyproxy
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $depends
Suggests: etcd-client
Section: net
Priority: optional
Description: layer-4 TCP proxy and load balancer
 flyproxy relays TCP connections to backends. A JSON file lists apps, each with
 frontend ports and backend targets; a client that connects to any port of an
 app is relayed to a healthy target of that app (active and passive health
 checks, failover, p2c, random or round-robin balancing, PROXY protocol). The
 file can change at any time: the change is applied as a diff without dropping
 a connection.
 .
 Two modes: "simple" listens on every configured port; "bpf" listens on one
 port and an eBPF sk_lookup program steers every configured port to it, so any
 number of ports costs one socket (Linux 5.9 or later).
 .
 A fleet of instances can follow one config held in etcd: flyproxy-etcd-sync
 (driving etcdctl, from etcd-client) keeps the config file equal to an etcd key.
 .
 systemd units for both modes and for the etcd follower are included, none
 enabled or started.
EOF
printf '%s\n' /etc/default/flyproxy-etcd-sync /etc/flyproxy/config.json > "$pkg/DEBIAN/conffiles"
install -m 0755 "$dist/deb/postinst" "$dist/deb/prerm" "$dist/deb/postrm" "$pkg/DEBIAN/"
(cd "$pkg" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum) > "$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/control" "$pkg/DEBIAN/conffiles" "$pkg/DEBIAN/md5sums"

find "$pkg" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$out" >/dev/null
echo "$out"
