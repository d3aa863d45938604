# Sourced inside a new network namespace (`unshare --net`) by run.sh and starts.sh: loopback
# up and what 200,000 generated apps need of it.
ip link set lo up
# Every address of fd00::/8 is this host's (as 127.0.0.0/8 is for IPv4), so each app's IPv6
# /128 answers without one `ip addr add` per app.
ip -6 route add local fd00::/8 dev lo
# 200,000 apps' files, listeners and connections: well past the usual 1,024 descriptors.
ulimit -n 1048576 2>/dev/null || ulimit -n 524288 2>/dev/null || true
