/*
 * steer: flyproxy's sk_lookup program.
 *
 * The kernel runs it for every incoming connection in the network namespace it
 * is attached to, before the normal socket lookup. For a TCP (address, port) some
 * app owns, as the `hosts` map (exact addresses) or else the `bindings`
 * longest-prefix-match map says, it hands the
 * connection to flyproxy's one listener of the right family (from the `listeners`
 * sockmap), so any number of ports and addresses reach the proxy through a single
 * socket; accept() then reports the original destination as the accepted socket's
 * local address, from which the proxy picks the app (and, where apps share the
 * binding, reads the TLS server name). Every other (address, port) is left to
 * the kernel.
 *
 * User space (src/bpf/mod.rs) owns the maps: it fills `listeners` once at start
 * and adds/removes `hosts` and `bindings` entries on reload, as a diff. `stats` is read for metrics.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/*
 * Address families as ctx->family reports them. The uapi headers do not export
 * AF_* (they come from libc's <sys/socket.h>, unusable with -target bpf), so
 * they are spelled out; the values are fixed by the kernel ABI.
 */
#define AF_INET 2
#define AF_INET6 10

/* Keys of the `listeners` sockmap. Must match LISTENER_V4/LISTENER_V6 in mod.rs. */
#define LISTENER_V4 0
#define LISTENER_V6 1

/* Indices of the `stats` counters. Must match the STAT_* constants in mod.rs. */
enum stat {
	STAT_STEERED = 0,          /* assigned to our listener */
	STAT_DROPPED_NO_LISTENER = 1, /* ours, but no listener of that family */
	STAT_PASSED = 2,           /* TCP, but no app's (address, port) */
	STAT_DROPPED_ASSIGN = 3,   /* ours, bpf_sk_assign refused the socket */
	STAT_MAX,
};

/*
 * flyproxy's listening sockets, IPv4 at key 0 and IPv6 (a V6ONLY socket) at
 * key 1. User space writes socket fds; the map holds socket references, and a
 * socket closed by its owner disappears from the map on its own.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} listeners SEC(".maps");

/*
 * --bind: when family is set, only connections to that family (and, when match_addr
 * is set, to that address, network order) are ours. One entry, at key 0.
 */
struct bind_addr {
	__u32 family;
	__u32 match_addr;
	__u32 ip4;
	__u32 ip6[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bind_addr);
} bind SEC(".maps");

static __always_inline int bound_elsewhere(struct bpf_sk_lookup *ctx)
{
	__u32 zero = 0, ip4, ip6_0, ip6_1, ip6_2, ip6_3;
	struct bind_addr *b = bpf_map_lookup_elem(&bind, &zero);

	if (!b || !b->family)
		return 0;
	if (ctx->family != b->family)
		return 1;
	if (!b->match_addr)
		return 0;
	/*
	 * Every context and map field is read at its own constant offset, all of them
	 * unconditionally: the verifier refuses a context pointer with a computed offset,
	 * and (without CAP_PERFMON) a map value pointer with one, both of which clang
	 * would otherwise make of an ip4-or-ip6 choice.
	 */
	ip4 = ctx->local_ip4 ^ b->ip4;
	ip6_0 = ctx->local_ip6[0] ^ b->ip6[0];
	ip6_1 = ctx->local_ip6[1] ^ b->ip6[1];
	ip6_2 = ctx->local_ip6[2] ^ b->ip6[2];
	ip6_3 = ctx->local_ip6[3] ^ b->ip6[3];
	if (ctx->family == AF_INET)
		return ip4 != 0;
	return (ip6_0 | ip6_1 | ip6_2 | ip6_3) != 0;
}

/*
 * The (address prefix, port) pairs some app owns, keyed the way Cloudflare's
 * tubular keys its bindings: the port first, then the address, so that one
 * lookup with a full-length key finds "this port exactly, then the longest
 * address prefix". IPv4 is stored v4-mapped (::ffff:a.b.c.d), so both families
 * live in one trie; prefixlen = 32 (the port word) + 96 + IPv4 prefix length,
 * or 32 + IPv6 prefix length. The port is a __u32 in host byte order, as
 * ctx->local_port is; its whole word is always inside the prefix, so the byte
 * order only has to agree with user space.
 */
struct binding_key {
	__u32 prefixlen;
	__u32 port;
	__u32 addr[4]; /* network order */
};

struct binding {
	__u32 group;  /* port group: counter index of the app(s) on this binding */
	__u32 family; /* AF_INET or AF_INET6: the family of the configured prefix */
};

/*
 * BPF_F_NO_PREALLOC is mandatory for LPM tries; max_entries only bounds the
 * count (every port on 16 prefixes); memory is taken per entry written. A
 * config beyond it fails its map writes, which are logged and retried.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct binding_key);
	__type(value, struct binding);
} bindings SEC(".maps");

/*
 * The bindings of one address exactly (an IPv4 /32 or an IPv6 /128), by (port,
 * address): the same key as `bindings` less its prefix length, the same value.
 * An edge gives most apps an address of their own, so most bindings are these;
 * a hash map takes one in a fraction of what the trie's insert costs (a start
 * with 200,000 apps writes 800,000 of them), and a full-length prefix is always
 * the longest match for its address, so looking here first gives the trie's
 * answer. User space writes every full-length binding here and only shorter
 * ones in `bindings`. BPF_F_NO_PREALLOC: memory per entry written, as the trie.
 */
struct host_key {
	__u32 port;
	__u32 addr[4]; /* network order, IPv4 v4-mapped */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct host_key);
	__type(value, struct binding);
} hosts SEC(".maps");

/*
 * Per port group: steered at index 2 * group, dropped at 2 * group + 1. Groups at or
 * beyond MAX_GROUPS share the last one (user space never hands out more).
 */
#define MAX_GROUPS 4096
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_GROUPS * 2);
	__type(key, __u32);
	__type(value, __u64);
} group_stats SEC(".maps");

/* Per-CPU counters, so increments need no atomics; user space sums the CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *value = bpf_map_lookup_elem(&stats, &idx);

	if (value)
		*value += 1;
}

static __always_inline void count_group(__u32 group, __u32 dropped)
{
	__u32 idx;
	__u64 *value;

	if (group >= MAX_GROUPS)
		group = MAX_GROUPS - 1;
	idx = group * 2 + dropped;
	value = bpf_map_lookup_elem(&group_stats, &idx);
	if (value)
		*value += 1;
}

SEC("sk_lookup")
int steer(struct bpf_sk_lookup *ctx)
{
	struct binding_key key = {};
	struct binding *b;
	struct bpf_sock *sk;
	__u32 ip4, ip6_0, ip6_1, ip6_2, ip6_3, idx, group;
	long err;

	/*
	 * flyproxy only proxies TCP. SK_PASS without assigning a socket lets the
	 * regular lookup (and any other sk_lookup program) handle UDP and the rest.
	 */
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;

	/*
	 * A full-length key for the dialled address. Every context field is read at
	 * its own constant offset, unconditionally: the verifier refuses a context
	 * pointer with a computed offset, which clang would make of an ip4-or-ip6
	 * choice.
	 */
	ip4 = ctx->local_ip4;
	ip6_0 = ctx->local_ip6[0];
	ip6_1 = ctx->local_ip6[1];
	ip6_2 = ctx->local_ip6[2];
	ip6_3 = ctx->local_ip6[3];

	key.prefixlen = 32 + 128;
	/* local_port is a __u32 in host byte order. */
	key.port = ctx->local_port;
	if (ctx->family == AF_INET) {
		/* ::ffff:a.b.c.d, in network order as the map stores it. */
		key.addr[2] = bpf_htonl(0x0000ffff);
		key.addr[3] = ip4;
	} else if (ctx->family == AF_INET6) {
		key.addr[0] = ip6_0;
		key.addr[1] = ip6_1;
		key.addr[2] = ip6_2;
		key.addr[3] = ip6_3;
	} else {
		/* sk_lookup only runs for inet sockets; pass anything else untouched. */
		return SK_PASS;
	}

	/* The exact address first; `key` minus its prefix length is the hosts key. */
	b = bpf_map_lookup_elem(&hosts, &key.port);
	if (!b)
		b = bpf_map_lookup_elem(&bindings, &key);
	if (!b) {
		/*
		 * No app owns this (address, port): SK_PASS without assigning, so
		 * other sockets and programs in the netns are untouched (a local
		 * sshd on 22 keeps working, as does anything on an address or port
		 * no app names).
		 */
		count(STAT_PASSED);
		return SK_PASS;
	}

	if (b->family != ctx->family) {
		/*
		 * The longest match is an IPv6 prefix short enough to cover the
		 * v4-mapped space (::/0, say) and no IPv4 prefix covers this
		 * address: an app that asked for IPv6 addresses does not take IPv4.
		 * Not ours: pass, as for an address no app names.
		 */
		count(STAT_PASSED);
		return SK_PASS;
	}

	idx = ctx->family == AF_INET ? LISTENER_V4 : LISTENER_V6;
	group = b->group;

	if (bound_elsewhere(ctx)) {
		/*
		 * Ours, but not the address the proxy was bound to (--bind):
		 * not ours either. SK_PASS without assigning leaves it to whatever
		 * else listens there, exactly as for a foreign port.
		 */
		count(STAT_PASSED);
		return SK_PASS;
	}

	/* From sk_lookup a sockmap lookup returns a referenced socket (or NULL). */
	sk = bpf_map_lookup_elem(&listeners, &idx);
	if (!sk) {
		/*
		 * The binding is ours but our listener of this family is gone
		 * (closed, being replaced, or never given). SK_DROP ends the
		 * lookup with no socket: the regular lookup is skipped, so the
		 * connection cannot land on some other socket that happens to be
		 * bound to this port; tubular does the same. For TCP the kernel
		 * then answers the SYN with a RST (the client sees "connection
		 * refused", as if the proxy were down; it does not retransmit).
		 */
		count(STAT_DROPPED_NO_LISTENER);
		count_group(group, 1);
		return SK_DROP;
	}

	/*
	 * Flags 0: if our listener is in an SO_REUSEPORT group the group still
	 * picks, and we do not override a socket an earlier program chose.
	 */
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		/*
		 * The socket cannot take this connection (wrong family or
		 * protocol, not listening, or an earlier program already
		 * assigned one). The binding is still ours, so do not let the
		 * regular lookup hand it elsewhere: drop (refused, as above).
		 */
		count(STAT_DROPPED_ASSIGN);
		count_group(group, 1);
		return SK_DROP;
	}

	/* SK_PASS after a successful assign: the kernel uses our socket. */
	count(STAT_STEERED);
	count_group(group, 0);
	return SK_PASS;
}

/*
 * The kernel checks this string: GPL-compatible licenses may call GPL-only
 * helpers. Dual BSD/GPL is what tubular and the kernel samples use.
 */
char LICENSE[] SEC("license") = "Dual BSD/GPL";
