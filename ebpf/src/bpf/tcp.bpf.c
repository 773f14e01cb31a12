// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * tcp: connection lifecycle from sock:inet_sock_set_state (tp_btf, CO-RE reads of the socket) and
 * retransmissions from tcp:tcp_retransmit_skb, per cgroup (the socket's, as state changes often
 * run in softirq context where "current" means nothing): opened as client or server, failed
 * (refused, timeout, reset), closed with bytes, smoothed RTT and duration. An iterator over the
 * kernel's TCP sockets (iter/tcp), run by the agent at every collection, samples the smoothed
 * RTT of connections still open.
 *
 * Counters and distributions are kept per peer, for at most max_peers peers per cgroup (the first
 * seen); a cgroup's other connections, and any a full map refuses, are counted in its tcp_other
 * entry, so the series always add up to what happened. The agent adds the peers' distributions
 * up per cgroup, role and server port; kept beside the counters they cost a closing connection
 * no second hash lookup (a map of their own keyed by cgroup, role and port did: about 13 % of
 * the program's time per loopback connection, BENCHMARKS.md).
 *
 * The state-change program runs five to seven times per connection, in the default config: it
 * leaves at once on the transitions no metric reads; it reads the socket with direct loads from
 * its BTF-typed pointer (and bpf_skc_to_tcp_sock for the tcp_sock fields), never with a helper
 * call per field (bpf_probe_read_kernel, what BPF_CORE_READ does), which cost a few hundred ns
 * per connection; it keeps open sockets in a table of slots claimed with a compare-and-swap
 * instead of a hash map's locked insert and delete, and takes the time a connection was
 * established from the TCP stack's own clock instead of reading the clock again
 * (benches/tcp_state/cost.sh, BENCHMARKS.md). The rare paths (retransmits, the iterator) keep
 * BPF_CORE_READ.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "podscope.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define ECONNRESET 104
#define ETIMEDOUT 110
#define ECONNREFUSED 111
#define RCV_SHUTDOWN 1
#define SEND_SHUTDOWN 2

/* Set by the loader (probes.tcp.max_peers). */
const volatile __u32 max_peers = 100;

/* Set by the loader (probes.tcp.duration_sample_one_in, a power of two, less one): the sockets
 * whose kernel hash has these bits clear are timed from established to closed; the others are
 * counted (opened, closed, bytes, RTT at close) without any record of their own. */
const volatile __u32 duration_sample_mask = 15;

/* peer → counters, and duration and RTT at close; at most max_peers peers per cgroup */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct podscope_tcp_key);
	__type(value, struct podscope_tcp_stats);
} tcp_conn_stats SEC(".maps");

/* (cgroup, family, role) → counters and distributions of the peers beyond max_peers and of what
 * the maps above refused */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 2048);
	__type(key, struct podscope_tcp_other_key);
	__type(value, struct podscope_tcp_stats);
} tcp_other SEC(".maps");

/* cgroup → its peers in tcp_conn_stats */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u64);
} tcp_cgroup_peers SEC(".maps");

/* Open sockets sampled for their duration (duration_sample_mask), which this probe saw
 * established: when, their role, their server port and whether they are counted in tcp_other.
 * Keeping that for every socket cost the most of the state-change program's time per loopback
 * connection: the record is written on the CPU that opens the connection and read and freed on
 * the one that closes it, two cache-line moves per socket, and the clock is read at close
 * (BENCHMARKS.md, issue 11); sockets not sampled need none of it at close (see closing_role).
 * A table of slots: a socket claims the first free one of the
 * PODSCOPE_TCP_LIVE_PROBES slots from a place hashed from its addresses and ports, with a
 * compare-and-swap of its address, and frees it with a store at close. A hash map's insert and
 * delete per connection (bucket locks, an allocation, a deferred free) cost about a fifth of the
 * probe's time per loopback connection here (BENCHMARKS.md, issue 11). A socket that finds its
 * slots taken is refused and counted, as a full map's insert is. Sized by the loader: `live_slots`
 * is the array's max_entries. */
const volatile __u32 live_slots = 8192;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, struct podscope_tcp_live);
} tcp_live SEC(".maps");

/* How connections are counted as opened, set by the agent. With the iterator below (generation
 * not 0), not when they open: the agent takes a peer's connections opened as those closed plus
 * those open, which the iterator counts at each collection (open_now). So a connection's open
 * costs nothing here but for the ones timed (duration_sample_mask): each of the two sockets of a
 * loopback connection skipped a hash lookup and an atomic add on a line its close does not
 * write (BENCHMARKS.md, issue 11). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct podscope_tcp_open_mode);
} tcp_open_mode SEC(".maps");

/* (cgroup, role, server port) → smoothed RTTs of its open connections, sampled by the iterator
 * below; emptied by the agent before each run */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 2048);
	__type(key, struct podscope_tcp_dist_key);
	__type(value, struct podscope_hist);
} tcp_live_rtt SEC(".maps");

static struct podscope_tcp_stats zero_stats;
static struct podscope_hist zero_hist;
static __u64 zero_peers;

/* The server's port: the peer's for a client, the local one for a server. `sk` is BTF-typed
 * (a tp_btf argument): direct loads. */
static __always_inline __u16 server_port_of(const struct sock *sk, __u32 role)
{
	if (role == TCP_ROLE_CLIENT)
		return __builtin_bswap16(sk->__sk_common.skc_dport);
	return sk->__sk_common.skc_num;
}

/* The counters' key of `sk` (BTF-typed: direct loads). */
static __always_inline int make_key(const struct sock *sk, __u32 role, __u16 server_port, struct podscope_tcp_key *key)
{
	__u16 family = sk->__sk_common.skc_family;
	if (family != AF_INET && family != AF_INET6)
		return -1;
	__builtin_memset(key, 0, sizeof(*key));
	key->cgroup_id = sk->sk_cgrp_data.cgroup->kn->id;
	key->family = family;
	key->role = role;
	if (family == AF_INET) {
		__u32 daddr = sk->__sk_common.skc_daddr;
		__builtin_memcpy(key->peer, &daddr, 4);
	} else {
		__builtin_memcpy(key->peer, sk->__sk_common.skc_v6_daddr.in6_u.u6_addr8, 16);
		/* An IPv4 peer of a dual-stack socket (::ffff:a.b.c.d) is an IPv4 peer. */
		__u32 words[4];
		__builtin_memcpy(words, key->peer, sizeof(words));
		if (words[0] == 0 && words[1] == 0 && words[2] == __builtin_bswap32(0xffff)) {
			__builtin_memset(key->peer, 0, sizeof(key->peer));
			__builtin_memcpy(key->peer, &words[3], 4);
			key->family = AF_INET;
		}
	}
	key->server_port = server_port;
	return 0;
}

/* `key`'s cgroup's entry in tcp_other; NULL (counted) when that map is full. */
static __always_inline struct podscope_tcp_stats *other_of(const struct podscope_tcp_key *key)
{
	struct podscope_tcp_other_key other_key = {
		.cgroup_id = key->cgroup_id,
		.family = key->family,
		.role = key->role,
	};
	return podscope_lookup_or_init(&tcp_other, TCP_MAP_OTHER, &other_key, &zero_stats);
}

/* Takes room for one more peer of `cgroup_id` under max_peers. Several CPUs may take the last
 * room at once: each adds one, and whoever went past the cap gives it back. */
static __always_inline int reserve_peer(__u64 cgroup_id)
{
	__u64 *peers = podscope_lookup_or_init(&tcp_cgroup_peers, TCP_MAP_CGROUP_PEERS, &cgroup_id, &zero_peers);
	if (!peers)
		return 0;
	if (__sync_fetch_and_add(peers, 1) < max_peers)
		return 1;
	__sync_fetch_and_sub(peers, 1);
	return 0;
}

static __always_inline void release_peer(__u64 cgroup_id)
{
	__u64 *peers = bpf_map_lookup_elem(&tcp_cgroup_peers, &cgroup_id);
	if (peers)
		__sync_fetch_and_sub(peers, 1);
}

/* The counters and distributions of `key`'s peer: its own entry while its cgroup has room under
 * max_peers, else (or when tcp_conn_stats is full) its cgroup's tcp_other entry, and *other says
 * so; NULL (counted) only when tcp_other is full as well. */
static __always_inline struct podscope_tcp_stats *stats_for(const struct podscope_tcp_key *key, __u8 *other)
{
	*other = 0;
	struct podscope_tcp_stats *stats = bpf_map_lookup_elem(&tcp_conn_stats, key);
	if (stats)
		return stats;
	if (reserve_peer(key->cgroup_id)) {
		/* -EEXIST: another CPU made the entry first, and took its own room for it. */
		if (podscope_insert(&tcp_conn_stats, TCP_MAP_CONN_STATS, key, &zero_stats, BPF_NOEXIST) != 0)
			release_peer(key->cgroup_id);
		stats = bpf_map_lookup_elem(&tcp_conn_stats, key);
		if (stats)
			return stats;
	}
	*other = 1;
	return other_of(key);
}

/* Whether `sk` is one of the sockets timed from established to closed: from the kernel's hash of
 * its addresses and ports (skc_hash, set when the socket is hashed, before it is established, and
 * kept until it is freed), so the same answer when it opens and when it closes. */
static __always_inline int duration_sampled(const struct sock *sk)
{
	return (sk->__sk_common.skc_hash & duration_sample_mask) == 0;
}

/* The role of a closing socket that has no slot: an accepted socket is a copy of its listener and
 * keeps the listen() backlog, a connecting one never listened. (At close the kernel has released
 * the local port: the bind bucket role_from_socket reads is gone.) A server whose backlog is 0
 * (listen(fd, 0)) reads as a client here. */
static __always_inline __u32 closing_role(const struct sock *sk)
{
	return sk->sk_max_ack_backlog > 0 ? TCP_ROLE_SERVER : TCP_ROLE_CLIENT;
}

/* The server's port of a closing socket: the peer's for a client; for a server the local port,
 * from inet_sport, which the kernel keeps when it releases the port (skc_num then reads 0). */
static __always_inline __u16 closing_server_port(const struct tcp_sock *tp, __u32 role)
{
	if (role == TCP_ROLE_CLIENT)
		return __builtin_bswap16(tp->inet_conn.icsk_inet.sk.__sk_common.skc_dport);
	return __builtin_bswap16(tp->inet_conn.icsk_inet.inet_sport);
}

/* The role of a connection this probe did not see established (open before it loaded, or
 * still sending its SYN), from its socket: an accepted socket is a copy of its listener and keeps
 * the listen() backlog (a socket that connects never listened), so it is a server's; a SYN still
 * being sent, or a local port the kernel picked for connect() (connect() alone makes bind buckets
 * marked fastreuse -1), is a client's. Anything else (a client that bound its port itself, a
 * listener with backlog 0) is unknown, and has no server port. */
static __always_inline __u32 role_from_socket(const struct sock *sk)
{
	if (BPF_CORE_READ(sk, sk_max_ack_backlog) > 0)
		return TCP_ROLE_SERVER;
	if (BPF_CORE_READ(sk, __sk_common.skc_state) == TCP_SYN_SENT)
		return TCP_ROLE_CLIENT;
	const struct inet_bind_bucket *bucket = BPF_CORE_READ((const struct inet_connection_sock *)sk, icsk_bind_hash);
	if (bucket && BPF_CORE_READ(bucket, fastreuse) < 0)
		return TCP_ROLE_CLIENT;
	return TCP_ROLE_UNKNOWN;
}

/* The first of the slots where `sk` may be (PODSCOPE_TCP_LIVE_PROBES from there, wrapping): from
 * the kernel's hash of its addresses and ports (skc_hash, set when an established socket is
 * hashed and kept until it is freed), scaled to the table (no division, any size). */
static __always_inline __u32 live_home(const struct sock *sk)
{
	return (__u32)(((__u64)sk->__sk_common.skc_hash * live_slots) >> 32);
}

/* `sk`'s slot, NULL when it has none (not seen established, or closed). */
static __always_inline struct podscope_tcp_live *live_find(const struct sock *sk)
{
	__u32 index = live_home(sk);
#pragma unroll
	for (int i = 0; i < PODSCOPE_TCP_LIVE_PROBES; i++) {
		struct podscope_tcp_live *slot = bpf_map_lookup_elem(&tcp_live, &index);
		if (slot && slot->sk == (__u64)sk)
			return slot->role ? slot : 0;
		index = index + 1 == live_slots ? 0 : index + 1;
	}
	return 0;
}

/* A slot for `sk`: its own if it holds one, else a free one claimed for it; NULL (counted as a
 * refused insert) when every slot it may use is taken. */
static __always_inline struct podscope_tcp_live *live_claim(const struct sock *sk)
{
	__u32 index = live_home(sk);
	__u64 id = (__u64)sk;
#pragma unroll
	for (int i = 0; i < PODSCOPE_TCP_LIVE_PROBES; i++) {
		struct podscope_tcp_live *slot = bpf_map_lookup_elem(&tcp_live, &index);
		if (slot && (slot->sk == id || (slot->sk == 0 && __sync_val_compare_and_swap(&slot->sk, 0, id) == 0)))
			return slot;
		index = index + 1 == live_slots ? 0 : index + 1;
	}
	podscope_count_failed_insert(TCP_MAP_LIVE);
	return 0;
}

/* When `sk` became established: the TCP stack's own clock (tcp_clock_cache, CLOCK_MONOTONIC like
 * bpf_ktime_get_ns), refreshed when it began processing the segment that completed the
 * handshake, just before this state change (on average 0.1 to 0.6 µs before it, measured here),
 * so the clock is not read a second time (~40 ns a read on this VM). */
static __always_inline __u64 established_ns(const struct sock *sk)
{
	const struct tcp_sock *tp = bpf_skc_to_tcp_sock((void *)sk);
	__u64 stamp = tp ? tp->tcp_clock_cache : 0;
	return stamp ? stamp : bpf_ktime_get_ns();
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(podscope_tcp_state, const struct sock *sk, const int oldstate, const int newstate)
{
	/* Half the runs are transitions no metric reads (SYN_SENT, SYN_RECV, FIN_WAIT, ...): out
	 * before the socket is touched. */
	if (newstate != TCP_ESTABLISHED && newstate != TCP_CLOSE)
		return 0;
	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;
	struct podscope_tcp_key key;
	struct podscope_tcp_stats *stats;
	__u8 other;

	if (newstate == TCP_ESTABLISHED) {
		if (oldstate != TCP_SYN_SENT && oldstate != TCP_SYN_RECV)
			return 0;
		__u32 zero = 0;
		const struct podscope_tcp_open_mode *mode = bpf_map_lookup_elem(&tcp_open_mode, &zero);
		int counted_at_collection = mode && mode->generation;
		int sampled = duration_sampled(sk);
		if (counted_at_collection && !sampled)
			return 0;
		__u32 role = oldstate == TCP_SYN_SENT ? TCP_ROLE_CLIENT : TCP_ROLE_SERVER;
		if (make_key(sk, role, server_port_of(sk, role), &key) || podscope_skip_cgroup(key.cgroup_id))
			return 0;
		stats = stats_for(&key, &other);
		if (stats && !counted_at_collection)
			__sync_fetch_and_add(&stats->counts.opened, 1);
		if (!sampled)
			return 0;
		struct podscope_tcp_live *live = live_claim(sk);
		if (!live)
			return 0;
		live->since_ns = established_ns(sk);
		live->server_port = key.server_port;
		live->other = other;
		/* Last: readers on other CPUs (the iterator) take a slot with a role as filled. */
		barrier();
		live->role = role;
		return 0;
	}

	if (oldstate == TCP_SYN_SENT) {
		if (make_key(sk, TCP_ROLE_CLIENT, server_port_of(sk, TCP_ROLE_CLIENT), &key) ||
		    podscope_skip_cgroup(key.cgroup_id))
			return 0;
		stats = stats_for(&key, &other);
		if (!stats)
			return 0;
		int err = sk->sk_err;
		if (err == ECONNREFUSED)
			__sync_fetch_and_add(&stats->counts.failed_refused, 1);
		else if (err == ETIMEDOUT)
			__sync_fetch_and_add(&stats->counts.failed_timeout, 1);
		else if (err == ECONNRESET)
			__sync_fetch_and_add(&stats->counts.failed_reset, 1);
		else
			__sync_fetch_and_add(&stats->counts.failed_other, 1);
		return 0;
	}

	/* A close of an established connection (not a listener's, nor a socket that never got
	 * past the handshake). */
	if (oldstate == TCP_LISTEN || oldstate == TCP_SYN_RECV || oldstate == TCP_CLOSE)
		return 0;
	/* A checked cast: the verifier knows `tp` as a tcp_sock (a plain cast would leave it a sock,
	 * whose bounds the tcp_sock fields are beyond). */
	const struct tcp_sock *tp = bpf_skc_to_tcp_sock((void *)sk);
	if (!tp)
		return 0;
	struct podscope_tcp_live *found = duration_sampled(sk) ? live_find(sk) : 0;
	struct podscope_tcp_live live = {};
	__u64 duration = 0;
	if (found) {
		live = *found;
		/* Freed: no role first (readers skip it), then no socket (claimable). */
		found->role = 0;
		barrier();
		found->sk = 0;
		duration = bpf_ktime_get_ns() - live.since_ns;
	} else {
		/* Not timed (not sampled, open before the probe loaded, or refused a slot): counted
		 * all the same, its role and server port read from the socket. */
		live.role = closing_role(sk);
		live.server_port = closing_server_port(tp, live.role);
	}
	if (make_key(sk, live.role, live.server_port, &key) || podscope_skip_cgroup(key.cgroup_id))
		return 0;
	/* Where it was counted when it opened: its peer's entry, or its cgroup's tcp_other. */
	stats = live.other ? other_of(&key) : stats_for(&key, &other);
	if (!stats)
		return 0;
	__sync_fetch_and_add(&stats->counts.closed, 1);
	if (found)
		podscope_hist_add(&stats->dists.duration_ns, duration);
	{
		/* bytes_acked and bytes_received count sequence space: a FIN in either direction
		 * takes one, and so does the client's SYN in bytes_acked (the passive side's SYN-ACK
		 * is not in it: the accepted socket starts with it acknowledged). Payload only, and
		 * added only when there is some (a connection without payload spares two atomic
		 * adds). */
		__u64 acked = tp->bytes_acked;
		__u64 received = tp->bytes_received;
		__u8 shutdown = sk->sk_shutdown;
		int fin_acked = (shutdown & SEND_SHUTDOWN) && tp->snd_una == tp->write_seq;
		__u64 control_out = (live.role == TCP_ROLE_CLIENT ? 1 : 0) + (fin_acked ? 1 : 0);
		__u64 control_in = (shutdown & RCV_SHUTDOWN) ? 1 : 0;
		if (acked > control_out)
			__sync_fetch_and_add(&stats->counts.bytes_sent, acked - control_out);
		if (received > control_in)
			__sync_fetch_and_add(&stats->counts.bytes_received, received - control_in);
		/* srtt_us holds 8 × the smoothed RTT in µs. */
		podscope_hist_add(&stats->dists.srtt_ns, (__u64)(tp->srtt_us >> 3) * 1000);
	}
	return 0;
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(podscope_tcp_retransmit, const struct sock *sk, const struct sk_buff *skb)
{
	struct podscope_tcp_live *live = duration_sampled(sk) ? live_find(sk) : 0;
	__u32 role = live ? live->role : role_from_socket(sk);
	__u16 server_port = live ? live->server_port : role == TCP_ROLE_UNKNOWN ? 0 : server_port_of(sk, role);
	struct podscope_tcp_key key;
	if (make_key(sk, role, server_port, &key) || podscope_skip_cgroup(key.cgroup_id))
		return 0;
	__u8 other;
	struct podscope_tcp_stats *stats = live && live->other ? other_of(&key) : stats_for(&key, &other);
	if (stats)
		__sync_fetch_and_add(&stats->counts.retransmits, 1);
	return 0;
}

/* Runs once per TCP socket when the agent reads the iterator (once per collection). Counts each
 * peer's open connections (established and not yet closed: FIN and close-wait states included)
 * for this run (tcp_open_mode's generation), and samples the smoothed RTT of those established.
 * The role of a connection comes from its slot for the sockets timed (duration_sample_mask),
 * else from the socket (role_from_socket; open connections still hold their port), which also
 * covers connections open before the probe loaded; a connection of unknown role is neither
 * counted open nor sampled (its close counts it). Writes nothing to the seq file. */
SEC("iter/tcp")
int podscope_tcp_live_rtt(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	if (!skc)
		return 0;
	int state = BPF_CORE_READ(skc, skc_state);
	if (state != TCP_ESTABLISHED && state != TCP_FIN_WAIT1 && state != TCP_FIN_WAIT2 &&
	    state != TCP_CLOSE_WAIT && state != TCP_LAST_ACK && state != TCP_CLOSING)
		return 0;
	/* A trusted tcp_sock (a time-wait socket is not one, and its close was counted): direct
	 * loads, as at close. */
	const struct tcp_sock *tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	const struct sock *sk = (const struct sock *)tp;
	struct podscope_tcp_live *live = duration_sampled(sk) ? live_find(sk) : 0;
	struct podscope_tcp_key peer;
	__u32 role;
	__u16 server_port;
	if (live) {
		role = live->role;
		server_port = live->server_port;
	} else {
		role = role_from_socket(sk);
		if (role == TCP_ROLE_UNKNOWN)
			return 0;
		server_port = server_port_of(sk, role);
	}
	if (make_key(sk, role, server_port, &peer) || podscope_skip_cgroup(peer.cgroup_id))
		return 0;
	/* Where its close will count it: as the state-change program decides. */
	__u8 other;
	struct podscope_tcp_stats *stats = live && live->other ? other_of(&peer) : stats_for(&peer, &other);
	if (!stats)
		return 0;
	if (live)
		other = live->other;
	__u32 zero = 0;
	const struct podscope_tcp_open_mode *mode = bpf_map_lookup_elem(&tcp_open_mode, &zero);
	__u64 generation = mode ? mode->generation : 0;
	/* Only this program writes these, one run at a time. */
	if (stats->counts.open_generation != generation) {
		stats->counts.open_generation = generation;
		stats->counts.open_now = 0;
	}
	stats->counts.open_now++;
	if (state != TCP_ESTABLISHED)
		return 0;
	/* Connections counted in tcp_other are sampled without their server port, as their
	 * distributions at close are. */
	struct podscope_tcp_dist_key key = {
		.cgroup_id = peer.cgroup_id,
		.server_port = other ? 0 : server_port,
		.role = role,
	};
	struct podscope_hist *hist = podscope_lookup_or_init(&tcp_live_rtt, TCP_MAP_LIVE_RTT, &key, &zero_hist);
	if (!hist)
		return 0;
	podscope_hist_add(hist, (__u64)(tp->srtt_us >> 3) * 1000);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
