// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * tcp: connection lifecycle from sock:inet_sock_set_state (tp_btf, CO-RE reads of the socket) and
 * retransmissions from tcp:tcp_retransmit_skb, per cgroup (the socket's, as state changes often
 * run in softirq context where "current" means nothing) and peer: opened as client or server,
 * failed (refused, timeout, reset), closed with bytes, smoothed RTT and duration. An iterator
 * over the kernel's TCP sockets (iter/tcp), run by the agent at every collection, samples the
 * smoothed RTT of connections still open.
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

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct podscope_tcp_key);
	__type(value, struct podscope_tcp_stats);
} tcp_conn_stats SEC(".maps");

/* socket → when it was established, its role and its server port (recorded then: at close the
 * kernel has already released the local port, skc_num reads 0) */
struct podscope_tcp_live {
	__u64 since_ns;
	__u32 role;
	__u16 server_port;
	__u16 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct podscope_tcp_live);
} tcp_live SEC(".maps");

/* connection key → smoothed RTTs of its open connections, sampled by the iterator below;
 * emptied by the agent before each run */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct podscope_tcp_key);
	__type(value, struct podscope_hist);
} tcp_live_rtt SEC(".maps");

static struct podscope_tcp_stats zero_stats;
static struct podscope_hist zero_hist;

/* The server's port: the peer's for a client, the local one for a server. */
static __always_inline __u16 server_port_of(const struct sock *sk, __u32 role)
{
	if (role == TCP_ROLE_CLIENT)
		return __builtin_bswap16(BPF_CORE_READ(sk, __sk_common.skc_dport));
	return BPF_CORE_READ(sk, __sk_common.skc_num);
}

static __always_inline int make_key(const struct sock *sk, __u32 role, __u16 server_port, struct podscope_tcp_key *key)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return -1;
	__builtin_memset(key, 0, sizeof(*key));
	key->cgroup_id = BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);
	key->family = family;
	key->role = role;
	if (family == AF_INET) {
		__u32 daddr = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		__builtin_memcpy(key->peer, &daddr, 4);
	} else {
		BPF_CORE_READ_INTO(&key->peer, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
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

static __always_inline struct podscope_tcp_stats *stats_for(const struct sock *sk, __u32 role, __u16 server_port)
{
	struct podscope_tcp_key key;
	if (make_key(sk, role, server_port, &key))
		return 0;
	if (podscope_skip_cgroup(key.cgroup_id))
		return 0;
	return podscope_lookup_or_init(&tcp_conn_stats, TCP_MAP_CONN_STATS, &key, &zero_stats);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(podscope_tcp_state, const struct sock *sk, const int oldstate, const int newstate)
{
	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	__u64 id = (__u64)sk;

	if (newstate == TCP_ESTABLISHED && (oldstate == TCP_SYN_SENT || oldstate == TCP_SYN_RECV)) {
		__u32 role = oldstate == TCP_SYN_SENT ? TCP_ROLE_CLIENT : TCP_ROLE_SERVER;
		__u16 server_port = server_port_of(sk, role);
		struct podscope_tcp_stats *stats = stats_for(sk, role, server_port);
		if (!stats)
			return 0;
		__sync_fetch_and_add(&stats->opened, 1);
		struct podscope_tcp_live live = {
			.since_ns = bpf_ktime_get_ns(),
			.role = role,
			.server_port = server_port,
		};
		podscope_insert(&tcp_live, TCP_MAP_LIVE, &id, &live, BPF_ANY);
		return 0;
	}

	if (newstate != TCP_CLOSE)
		return 0;

	if (oldstate == TCP_SYN_SENT) {
		struct podscope_tcp_stats *stats = stats_for(sk, TCP_ROLE_CLIENT, server_port_of(sk, TCP_ROLE_CLIENT));
		if (!stats)
			return 0;
		int err = BPF_CORE_READ(sk, sk_err);
		if (err == ECONNREFUSED)
			__sync_fetch_and_add(&stats->failed_refused, 1);
		else if (err == ETIMEDOUT)
			__sync_fetch_and_add(&stats->failed_timeout, 1);
		else if (err == ECONNRESET)
			__sync_fetch_and_add(&stats->failed_reset, 1);
		else
			__sync_fetch_and_add(&stats->failed_other, 1);
		return 0;
	}

	struct podscope_tcp_live *live = bpf_map_lookup_elem(&tcp_live, &id);
	if (!live)
		return 0;
	__u32 role = live->role;
	__u16 server_port = live->server_port;
	__u64 duration = bpf_ktime_get_ns() - live->since_ns;
	bpf_map_delete_elem(&tcp_live, &id);
	struct podscope_tcp_stats *stats = stats_for(sk, role, server_port);
	if (!stats)
		return 0;
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	/* bytes_acked and bytes_received count sequence space: a FIN in either direction takes one,
	 * and so does the client's SYN in bytes_acked (the passive side's SYN-ACK is not in it: the
	 * accepted socket starts with it acknowledged). Report payload only. */
	__u64 acked = BPF_CORE_READ(tp, bytes_acked);
	__u64 received = BPF_CORE_READ(tp, bytes_received);
	__u8 shutdown = BPF_CORE_READ(sk, sk_shutdown);
	int fin_acked = (shutdown & SEND_SHUTDOWN) && BPF_CORE_READ(tp, snd_una) == BPF_CORE_READ(tp, write_seq);
	__u64 control_out = (role == TCP_ROLE_CLIENT ? 1 : 0) + (fin_acked ? 1 : 0);
	__u64 control_in = (shutdown & RCV_SHUTDOWN) ? 1 : 0;
	__sync_fetch_and_add(&stats->closed, 1);
	__sync_fetch_and_add(&stats->bytes_sent, acked > control_out ? acked - control_out : 0);
	__sync_fetch_and_add(&stats->bytes_received, received > control_in ? received - control_in : 0);
	podscope_hist_add(&stats->duration_ns, duration);
	/* srtt_us holds 8 × the smoothed RTT in µs. */
	__u64 srtt_ns = (__u64)(BPF_CORE_READ(tp, srtt_us) >> 3) * 1000;
	podscope_hist_add(&stats->srtt_ns, srtt_ns);
	return 0;
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

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(podscope_tcp_retransmit, const struct sock *sk, const struct sk_buff *skb)
{
	__u64 id = (__u64)sk;
	struct podscope_tcp_live *live = bpf_map_lookup_elem(&tcp_live, &id);
	__u32 role = live ? live->role : role_from_socket(sk);
	__u16 server_port = live ? live->server_port : role == TCP_ROLE_UNKNOWN ? 0 : server_port_of(sk, role);
	struct podscope_tcp_stats *stats = stats_for(sk, role, server_port);
	if (stats)
		__sync_fetch_and_add(&stats->retransmits, 1);
	return 0;
}

/* Runs once per TCP socket when the agent reads the iterator (once per collection): the smoothed
 * RTT of every established connection this probe saw open. Writes nothing to the seq file. */
SEC("iter/tcp")
int podscope_tcp_live_rtt(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	if (!skc)
		return 0;
	if (BPF_CORE_READ(skc, skc_state) != TCP_ESTABLISHED)
		return 0;
	/* Established sockets are full sockets: struct sock begins with its sock_common. */
	const struct sock *sk = (const struct sock *)skc;
	__u64 id = (__u64)sk;
	struct podscope_tcp_live *live = bpf_map_lookup_elem(&tcp_live, &id);
	/* Connections opened before the probe was loaded have no known role: not sampled. */
	if (!live)
		return 0;
	struct podscope_tcp_key key;
	if (make_key(sk, live->role, live->server_port, &key))
		return 0;
	if (podscope_skip_cgroup(key.cgroup_id))
		return 0;
	struct podscope_hist *hist = podscope_lookup_or_init(&tcp_live_rtt, TCP_MAP_LIVE_RTT, &key, &zero_hist);
	if (!hist)
		return 0;
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;
	podscope_hist_add(hist, (__u64)(BPF_CORE_READ(tp, srtt_us) >> 3) * 1000);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
