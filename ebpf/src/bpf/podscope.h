/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every struct and constant that crosses the kernel/userspace boundary, and the helpers the probes
 * share.
 *
 * Rules: fixed-size fields only, no implicit padding (explicit _pad fields), no bool, bytes as
 * __u8 (not char). The Rust side (podscope_ebpf::abi) is generated from this header by bindgen in
 * build.rs: structs, #define constants and enum constants are written here only.
 */
#ifndef PODSCOPE_H
#define PODSCOPE_H

/* Log2 distribution slots. Slot 0 holds the value 1, slot k (k >= 1) holds (2^(k-1), 2^k], so
 * slot k is the OTLP exponential-histogram (scale 0) bucket index k - 1. Zeros are counted apart.
 * 65 slots hold every value a __u64 can (slot 64 is (2^63, 2^64)): no duration is ever clamped
 * into a bucket below it. */
#define PODSCOPE_HIST_SLOTS 65

struct podscope_hist {
	__u64 zero_count;
	__u64 sum;
	__u64 slots[PODSCOPE_HIST_SLOTS];
};

/* syscalls probe: per cgroup and slot (a syscall's group, or the syscall itself: the loader's
 * slot_of table), the count and the errors, in one per-CPU entry. Syscall numbers from 0 to
 * PODSCOPE_SYSCALL_NRS - 1 are counted (x86_64's reach 462). */
#define PODSCOPE_SYSCALL_NRS 512

struct syscall_key {
	__u64 cgroup_id;
	__u32 slot;
	__u32 _pad;
};

struct syscall_counts {
	__u64 count;
	__u64 errors;
};

/* files probe: opens per cgroup and result (0 = success, else errno). */
struct open_key {
	__u64 cgroup_id;
	__u32 err;
	__u32 _pad;
};

/* files probe, capture_paths: successful opens per cgroup, collection epoch (the agent reads an
 * epoch once the kernel has moved on to the next, so no count races the read) and path. */
#define PODSCOPE_PATH_LEN 128
#define PODSCOPE_PATH_EPOCHS 3

struct open_path_key {
	__u64 cgroup_id;
	__u32 epoch;
	__u32 _pad;
	__u8 path[PODSCOPE_PATH_LEN];
};

/* Per cgroup and epoch: distinct paths tracked (at most `tracked_paths`), and the opens of any
 * other path, in the kernel, so the paths plus `other` always add up to the opens. */
struct open_path_key_cgroup {
	__u64 cgroup_id;
	__u32 epoch;
	__u32 _pad;
};

struct open_path_cgroup {
	__u32 distinct;
	__u32 _pad;
	__u64 other;
};

/* process probe: counters per cgroup, kind and exit code. */
enum process_kind {
	PROCESS_EXEC = 1,
	PROCESS_FORK = 2,
	PROCESS_EXIT = 3,
};

struct process_key {
	__u64 cgroup_id;
	__u32 kind;
	__s32 exit_code; /* PROCESS_EXIT only; 128 + signal when killed by a signal */
};

/* The exec/exit event stream (ring buffer). */
struct process_event {
	__u64 cgroup_id;
	__u64 timestamp_ns;
	__u64 lifetime_ns; /* PROCESS_EXIT only */
	__u32 kind;
	__u32 pid;
	__u32 ppid;
	__s32 exit_code;
	__u8 comm[16];
};

/* sched probe: context switches per cgroup and kind. */
enum switch_kind {
	SWITCH_VOLUNTARY = 1,
	SWITCH_INVOLUNTARY = 2,
};

struct switch_key {
	__u64 cgroup_id;
	__u32 kind;
	__u32 _pad;
};

/* block_io probe: per device and operation. */
enum block_op {
	BLOCK_READ = 0,
	BLOCK_WRITE = 1,
	BLOCK_FLUSH = 2,
	BLOCK_DISCARD = 3,
	BLOCK_OTHER = 4,
};

struct block_key {
	__u32 dev; /* major << 20 | minor, the kernel's dev_t */
	__u32 op;
};

struct block_stats {
	__u64 bytes;
	struct podscope_hist latency_ns;
};

/* uprobes probe: hits per cgroup, process and captured value (a string, or an integer's 8
 * bytes), for at most max_series keys; hits of further keys, and of keys a full map refused,
 * are counted per cgroup as `other`. One object is loaded per configured uprobe. */
#define PODSCOPE_UPROBE_VALUE_LEN 256

struct uprobe_key {
	__u64 cgroup_id;
	__u32 pid;
	__u32 value_len;
	__u8 value[PODSCOPE_UPROBE_VALUE_LEN];
};

/* uprobes probe, `container:` entries: which file the kernel sees behind each mapping of the
 * agent's own process (on overlayfs, the layer's file, the one a uprobe attaches to), written
 * by its iterator over the agent's mappings. */
struct podscope_mapped_file {
	__u64 start;
	__u64 ino;
	__u32 dev; /* the kernel's dev_t */
	__u32 _pad;
};

/* tcp probe. Counters and distributions per cgroup (the socket's) and peer, for at most max_peers
 * peers per cgroup; the cgroup's other peers, and what a full map refuses, go to its tcp_other
 * entry (per address family and role). The agent adds the peers' distributions up per cgroup,
 * role and server port: kept beside each peer's counters, a closing connection finds both with
 * one hash lookup (BENCHMARKS.md, issue 11). */
enum tcp_role {
	TCP_ROLE_CLIENT = 1,  /* active open: connect() */
	TCP_ROLE_SERVER = 2,  /* passive open: accept() */
	TCP_ROLE_UNKNOWN = 3, /* open before the probe, and its socket does not say (no server port) */
};

struct podscope_tcp_key {
	__u64 cgroup_id;
	__u8 peer[16];     /* IPv4 (also an IPv4-mapped IPv6 peer) in the first 4 bytes */
	__u16 server_port; /* the peer's port for clients, the local port for servers, else 0 */
	__u8 family;       /* AF_INET 2, AF_INET6 10 */
	__u8 role;
	__u32 _pad;
};

/* A peer's counters, laid out by the CPU that writes them. A connection usually opens on one CPU
 * (the connecting thread's, where loopback and softirq processing of the handshake run) and
 * closes on another (the thread that closes it, or the one that processes the peer's FIN or RST):
 * with `opened` and `closed` in one cache line, every connection moved that line, and the key
 * beside it that each lookup compares, from CPU to CPU, and a run waited for it (about 60 ns of
 * the state-change program's time per run on this VM, BENCHMARKS.md). So the rarely written
 * counters come first, where the entry's first bytes share a cache line with the key, then
 * `opened` in a line of its own, then what closing writes. The value starts 24 bytes into a cache
 * line in both tcp maps (a hash element is allocated whole from a power-of-two size class, with
 * bpf_mem_alloc's 8-byte header and the 48-byte struct htab_elem before the 32-byte key): the 40
 * bytes of rare counters fill that line. Elsewhere (another kernel's header size) only the
 * speed-up is lost. */
struct podscope_tcp_counts {
	__u64 failed_refused;
	__u64 failed_timeout;
	__u64 failed_reset;
	__u64 failed_other;
	__u64 retransmits;
	/* Connections established, counted when they open only without the iterator (see
	 * tcp_open_mode in tcp.bpf.c); with it the agent counts them as closed + open. */
	__u64 opened;
	/* The peer's connections open when the iterator's run open_generation went by them: written
	 * by the iterator only, once per collection. */
	__u64 open_now;
	__u64 open_generation;
	__u64 _opened_line[5]; /* the rest of opened's cache line */
	__u64 closed;
	__u64 bytes_sent;
	__u64 bytes_received;
};

/* tcp_open_mode's one value, written by the agent. */
struct podscope_tcp_open_mode {
	/* The iterator's run now (the agent counts one up before each); 0 while the probe has no
	 * iterator, and then the state-change program counts connections as they open. */
	__u64 generation;
};

/* tcp_live: a slot of the table of open sockets (tcp.bpf.c). */
#define PODSCOPE_TCP_LIVE_PROBES 8

struct podscope_tcp_live {
	__u64 sk;          /* the socket's address; 0: the slot is free */
	__u64 since_ns;    /* when it was established (CLOCK_MONOTONIC) */
	__u16 server_port; /* as in podscope_tcp_key */
	__u8 role;         /* enum tcp_role; 0 while the slot is being filled or freed */
	__u8 other;        /* counted in its cgroup's tcp_other entry */
	__u32 _pad;
};

struct podscope_tcp_dist_key {
	__u64 cgroup_id;
	__u16 server_port; /* 0: the connections counted in tcp_other */
	__u8 role;
	__u8 _pad[5];
};

struct podscope_tcp_dists {
	struct podscope_hist duration_ns;
	struct podscope_hist srtt_ns; /* smoothed RTT at close */
};

struct podscope_tcp_other_key {
	__u64 cgroup_id;
	__u8 family;
	__u8 role;
	__u8 _pad[22]; /* the size of podscope_tcp_key, so that the values of both maps share a layout */
};

/* The value of tcp_conn_stats (a peer) and of tcp_other (a cgroup's other peers). */
struct podscope_tcp_stats {
	struct podscope_tcp_counts counts;
	struct podscope_tcp_dists dists;
};

/* The receiver's record of a removed cgroup v2 directory (cgroups.bpf.c): its path below the
 * hierarchy's root, NUL-terminated (the kernel hands `cgroup_rmdir` the path of a cgroup at most
 * 1023 bytes long; longer records are cut). */
#define PODSCOPE_CGROUP_PATH_LEN 512

struct removed_cgroup {
	__u8 path[PODSCOPE_CGROUP_PATH_LEN];
};

/* http probe: the start of every HTTP/1 message and the bytes of HTTP/2 connections, read from
 * socket syscalls (and OpenSSL calls for TLS), sent to userspace, which parses and pairs them.
 * One event per syscall that carries data worth reading; the socket's addresses ride on each. */
#define PODSCOPE_HTTP_CAPTURE_MAX 1024

enum http_event_kind {
	HTTP_EVENT_DATA = 1,  /* bytes read or written on a connection */
	HTTP_EVENT_CLOSE = 2, /* the connection's descriptor was closed */
	HTTP_EVENT_BIND = 3,  /* the SSL object `ssl` uses this connection (its earlier plaintext too) */
};

enum http_direction {
	HTTP_DIR_IN = 1,  /* read by the process */
	HTTP_DIR_OUT = 2, /* written by the process */
};

enum http_protocol {
	HTTP_PROTO_UNKNOWN = 0,
	HTTP_PROTO_HTTP1 = 1,
	HTTP_PROTO_HTTP2 = 2,
	HTTP_PROTO_TLS = 3,   /* ciphertext on the socket; the plaintext comes from OpenSSL uprobes */
	HTTP_PROTO_OTHER = 4, /* not HTTP: not looked at again */
};

enum http_role {
	HTTP_ROLE_CLIENT = 1, /* connect() */
	HTTP_ROLE_SERVER = 2, /* accept() */
};

enum http_event_flag {
	HTTP_FLAG_TLS = 1,          /* plaintext of a TLS connection (from SSL_read/SSL_write) */
	HTTP_FLAG_CONTINUATION = 2, /* more of the message head begun by the previous event */
};

struct http_event_head {
	__u64 timestamp_ns; /* bpf_ktime_get_ns(): read at syscall exit, write at syscall entry */
	__u64 cgroup_id;
	__u64 ssl; /* TLS plaintext: the SSL object; with fd HTTP_NO_FD its socket is not known yet */
	__u32 tgid;
	__u32 tid;
	__u32 fd;
	__u32 total_len; /* bytes the call read or was asked to write; data holds the first `captured` */
	__u16 captured;
	__u8 kind;
	__u8 direction;
	__u8 protocol;
	__u8 role;
	__u8 family; /* AF_INET 2, AF_INET6 10 */
	__u8 flags;
	__u16 local_port;
	__u16 remote_port;
	__u8 local_addr[16]; /* IPv4 in the first 4 bytes */
	__u8 remote_addr[16];
	__u8 _pad[4]; /* to 8 bytes: no implicit padding (the scratch copy keeps it zero) */
};

#define HTTP_NO_FD 0xffffffff

/* What goes on the ring buffer: the head and `captured` bytes of data. */
struct http_event {
	struct http_event_head head;
	__u8 data[PODSCOPE_HTTP_CAPTURE_MAX];
};

/* Per-CPU counters of the http probe (index into http_counters). */
enum http_counter {
	HTTP_COUNTER_NOT_HTTP = 0,    /* connections whose first bytes were not HTTP */
	HTTP_COUNTER_EVENTS_LOST = 1, /* events that did not fit in the ring buffer */
	HTTP_COUNTER_SLOTS = 4,
};

/* profiling probe: one record per stack sample on the ring buffer (on-CPU from a perf event,
 * off-CPU from the scheduler), unwound and aggregated in userspace. The user stack is copied page
 * by page so that an unmapped page ends the copy instead of failing it whole; `ustack` is a ring
 * over the copied range: the byte at user address a (user_sp <= a < user_sp + ustack_bytes) is
 * ustack[(a - (user_sp & ~4095)) % PODSCOPE_PROFILE_USTACK_BYTES]. */
#define PODSCOPE_PROFILE_KSTACK_DEPTH 64
#define PODSCOPE_PROFILE_USTACK_BYTES 16384

enum profile_kind {
	PROFILE_ON_CPU = 1,
	PROFILE_OFF_CPU = 2,
};

enum profile_flags {
	PROFILE_USER_REGS = 1,  /* user_ip/sp/bp are the thread's user registers */
	PROFILE_USER_STALE = 2, /* off-CPU: the thread ran user code since it blocked, no user stack */
};

struct profile_sample_head {
	__u64 cgroup_id;
	__u64 timestamp_ns;
	__u64 off_cpu_ns; /* PROFILE_OFF_CPU: time blocked (summed over blocks in one syscall) */
	__u64 user_ip;
	__u64 user_sp;
	__u64 user_bp;
	__u64 exec_id; /* the task's self_exec_id: changes when the process execs (new mappings) */
	__u32 pid; /* thread group id */
	__u32 tid;
	__u32 kind;
	__u32 flags;
	__u32 kstack_bytes;
	__u32 ustack_bytes;
	__u8 comm[16];
	__u64 kstack[PODSCOPE_PROFILE_KSTACK_DEPTH];
};

struct profile_sample {
	struct profile_sample_head head;
	__u8 ustack[PODSCOPE_PROFILE_USTACK_BYTES];
};

/* Off-CPU: a thread's state while it is switched out (task storage, 32 bytes per thread seen). */
struct profile_blocked {
	__u64 since_ns; /* when it blocked; 0 while it runs */
	__u64 user_ip;  /* its user registers then, to tell whether they are still the same later */
	__u64 user_sp;
	__u64 _reserved;
};

/* Off-CPU: a block of at least the minimum time, waiting for the thread's next syscall exit,
 * where its user stack can be read (tid -> pending). */
struct profile_pending {
	__u64 off_cpu_ns;
	__u64 user_ip;
	__u64 user_sp;
	__u32 kstack_bytes;
	__u32 _pad;
	__u64 kstack[PODSCOPE_PROFILE_KSTACK_DEPTH];
};

/* trace object (the `session` extension's `kubectl podscope trace`): one program per event
 * probe, attached only while a session asks for it. Several sessions share the loaded object:
 * each has a slot (a bit of a __u64), each target cgroup a mask of the sessions that trace it,
 * and each probe the sessions that asked for it (and those of them that trace the whole node).
 * An event goes out once, with the mask of the sessions it is for. */
#define PODSCOPE_TRACE_MAX_SESSIONS 64
#define PODSCOPE_TRACE_FILENAME_LEN 256
#define PODSCOPE_TRACE_ARGV0_LEN 64

enum podscope_trace_probe {
	TRACE_EXEC = 0,
	TRACE_EXIT = 1,
	TRACE_OPEN = 2,
	TRACE_TCP_CONNECT = 3,
	TRACE_TCP_ACCEPT = 4,
	TRACE_TCP_CLOSE = 5,
	TRACE_TCP_RETRANSMIT = 6,
	TRACE_OOM_KILL = 7,
	TRACE_SIGNAL = 8,
	TRACE_PROBES = 9,
};

/* trace_probe_sessions[probe] */
struct podscope_trace_probe_sessions {
	__u64 subscribed; /* sessions that asked for this probe */
	__u64 whole_node; /* of those, the ones tracing every cgroup of the node */
};

enum podscope_trace_event_flag {
	TRACE_FLAG_DURATION = 1, /* duration_ns is set (tcp close of a connection seen opening) */
	TRACE_FLAG_TASK = 2,     /* pid, tid and comm are the process's (not a softirq's guest) */
};

/* One event on the trace ring buffer. Which fields mean something depends on the probe. */
struct podscope_trace_event {
	__u64 sessions;     /* the sessions it is for (bits of session slots) */
	__u64 cgroup_id;    /* the cgroup it was matched on (the socket's for tcp, the target's for signal and oom) */
	__u64 timestamp_ns; /* bpf_ktime_get_ns() */
	__u64 duration_ns;  /* exit: the process's lifetime; tcp close: since established */
	__s64 result;       /* open: the descriptor or -errno; tcp connect: 0 or -errno; signal: the kernel's delivery result */
	__u32 probe;        /* enum podscope_trace_probe */
	__u32 pid;          /* the process it happened to (tgid) */
	__u32 tid;
	__u32 ppid;
	__s32 exit_code;    /* exit: the status its parent sees, 128 + signal when killed */
	__u32 flags;        /* enum podscope_trace_event_flag */
	__u32 open_flags;   /* open: the O_* flags */
	__u32 signal;       /* signal: its number */
	__u32 sender_pid;   /* signal: who sent it; oom: the task whose allocation triggered it */
	__u16 family;       /* tcp: AF_INET 2, AF_INET6 10 */
	__u16 sport;        /* tcp: local port (host order) */
	__u16 dport;        /* tcp: remote port (host order) */
	__u8 _pad[6];
	__u8 saddr[16];     /* tcp: local address, IPv4 in the first 4 bytes */
	__u8 daddr[16];     /* tcp: remote address */
	__u8 comm[16];
	__u8 sender_comm[16];                       /* signal, oom: the sender's */
	__u8 filename[PODSCOPE_TRACE_FILENAME_LEN]; /* exec: the file executed; open: the path */
	__u8 argv0[PODSCOPE_TRACE_ARGV0_LEN];       /* exec: argv[0] */
};

enum podscope_trace_map_slot {
	TRACE_MAP_OPEN_ARGS = 0,
	TRACE_MAP_TCP_LIVE = 1,
	TRACE_MAP_TCP_CONNECTING = 2,
};

/* Failed map inserts (a full map, or no memory for a new entry) are counted per map, in the
 * object's map_full per-CPU array, at the map's slot: each probe numbers its maps here, and its
 * Rust MapDefs name the slot with the map. */
#define PODSCOPE_MAP_SLOTS 8
/* Every object's cgroup_filter (the kernel inserts admitted cgroups): the last slot. */
#define PODSCOPE_MAP_SLOT_CGROUP_FILTER 7

enum cgroups_map_slot {
	CGROUPS_MAP_REMOVED = 0,
};

enum process_map_slot {
	PROCESS_MAP_COUNTS = 0,
	PROCESS_MAP_LIFETIME = 1,
};

enum syscalls_map_slot {
	SYSCALLS_MAP_COUNTS = 0,
	SYSCALLS_MAP_LATENCY = 1,
};

enum files_map_slot {
	FILES_MAP_OPENS = 0,
	FILES_MAP_PATHS = 1,
	FILES_MAP_PATH_CGROUPS = 2,
};

enum sched_map_slot {
	SCHED_MAP_RUNQ_LATENCY = 0,
	SCHED_MAP_SWITCHES = 1,
	SCHED_MAP_RUNNABLE_SINCE = 2,
};

enum block_io_map_slot {
	BLOCK_IO_MAP_STATS = 0,
	BLOCK_IO_MAP_START = 1,
};

enum tcp_map_slot {
	TCP_MAP_CONN_STATS = 0,
	TCP_MAP_LIVE = 1,
	TCP_MAP_LIVE_RTT = 2,
	TCP_MAP_OTHER = 3,
	TCP_MAP_CGROUP_PEERS = 4,
};

enum uprobes_map_slot {
	UPROBES_MAP_HITS = 0,
	UPROBES_MAP_OTHER = 1,
};

/* The uprobe_series array: series the kernel admitted into uprobe_hits (it adds), and series the
 * agent removed from it (it writes); their difference is what the map holds. */
enum uprobe_series_slot {
	UPROBE_SERIES_ADMITTED = 0,
	UPROBE_SERIES_RELEASED = 1,
};

enum http_map_slot {
	HTTP_MAP_CONNS = 0,
	HTTP_MAP_SSL_CALLS = 1,
	HTTP_MAP_SSL_FDS = 2,
};

enum profiling_map_slot {
	PROFILING_MAP_PENDING = 0,
	PROFILING_MAP_BLOCKED = 1,
};

#ifdef __BPF__
/* ---- kernel side only ---- */
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

/* The syscall number and arguments in the registers saved at syscall entry (struct pt_regs of
 * tp_btf sys_enter / sys_exit). Written for x86_64 only: another architecture needs its own. */
#if defined(__TARGET_ARCH_x86)
#define PODSCOPE_SYSCALL_NR(regs) ((regs)->orig_ax)
#define PODSCOPE_SYSCALL_ARG1(regs) ((regs)->di)
#define PODSCOPE_SYSCALL_ARG2(regs) ((regs)->si)
#else
#error "podscope.h: the syscall-argument register access is written for x86_64 only"
#endif

/* The records of the per-syscall tracepoints (syscalls:sys_enter_<name>, sys_exit_<name>), as
 * their format files lay them out: the ctx of a tracepoint program, read at fixed offsets (no
 * CO-RE: the kernel's own struct ends in a flexible array CO-RE cannot index). */
struct podscope_syscall_enter {
	__u64 common;
	__s32 nr;
	__u32 _pad;
	__u64 args[6];
};

struct podscope_syscall_exit {
	__u64 common;
	__s32 nr;
	__u32 _pad;
	__s64 ret;
};

/* Set by the loader. */
const volatile __u32 agent_tgid = 0;   /* never observe the agent itself */
const volatile __u32 filter_mode = 0;  /* 0 all cgroups, 1 only those in cgroup_filter, 2 all but those */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u8);
} cgroup_filter SEC(".maps");

/* With filter_mode 1: cgroups whose new descendants are listed in cgroup_filter as they are
 * created (by podscope_cgroup_admit below), so a new container is counted from its first event,
 * before the receiver's next walk decides on it — the subtrees the filter can select in (an
 * include glob's fixed prefix, the kubelet's pod tree). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 256);
	__type(key, __u64);
	__type(value, __u8);
} cgroup_filter_roots SEC(".maps");

/* Failed inserts per map slot (see PODSCOPE_MAP_SLOTS), summed over CPUs by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PODSCOPE_MAP_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} map_full SEC(".maps");

#define PODSCOPE_EEXIST 17
/* cgroup_filter values: listed by the receiver, or by the kernel when the cgroup was created. */
#define PODSCOPE_CGROUP_LISTED 1
#define PODSCOPE_CGROUP_ADMITTED 2
/* Deepest cgroup nesting podscope_cgroup_admit looks through (the kubelet's is 4 or 5). */
#define PODSCOPE_CGROUP_MAX_DEPTH 16
/* signal_struct.flags: the thread group is exiting as a whole (exit_group, a fatal signal). */
#define PODSCOPE_SIGNAL_GROUP_EXIT 0x00000004

static __always_inline void podscope_count_failed_insert(__u32 slot)
{
	__u64 *failed = bpf_map_lookup_elem(&map_full, &slot);
	if (failed)
		*failed += 1;
}

/* bpf_map_update_elem, with a failure counted at `slot` (-EEXIST under BPF_NOEXIST is not one:
 * another CPU created the entry first). */
static __always_inline long podscope_insert(void *map, __u32 slot, const void *key, const void *value, __u64 flags)
{
	long err = bpf_map_update_elem(map, key, value, flags);
	if (err && err != -PODSCOPE_EEXIST)
		podscope_count_failed_insert(slot);
	return err;
}

static __always_inline int podscope_skip_cgroup(__u64 cgroup_id)
{
	if (filter_mode == 0)
		return 0;
	int listed = bpf_map_lookup_elem(&cgroup_filter, &cgroup_id) != 0;
	return filter_mode == 1 ? !listed : listed;
}

/* A new cgroup v2 directory under one of cgroup_filter_roots is listed at once (with
 * filter_mode 1; the loader attaches this program to every probe object then). */
SEC("tp_btf/cgroup_mkdir")
int BPF_PROG(podscope_cgroup_admit, struct cgroup *cgrp, const char *path)
{
	if (filter_mode != 1 || BPF_CORE_READ(cgrp, root, hierarchy_id) != 0)
		return 0;
	int level = BPF_CORE_READ(cgrp, level);
	/* ancestors[0] is the root, ancestors[level] the new cgroup itself. */
	for (int i = 0; i < PODSCOPE_CGROUP_MAX_DEPTH && i < level; i++) {
		struct cgroup *ancestor = 0;
		bpf_core_read(&ancestor, sizeof(ancestor), &cgrp->ancestors[i]);
		__u64 id = BPF_CORE_READ(ancestor, kn, id);
		if (bpf_map_lookup_elem(&cgroup_filter_roots, &id)) {
			__u64 self = BPF_CORE_READ(cgrp, kn, id);
			__u8 admitted = PODSCOPE_CGROUP_ADMITTED;
			podscope_insert(&cgroup_filter, PODSCOPE_MAP_SLOT_CGROUP_FILTER, &self, &admitted, BPF_NOEXIST);
			return 0;
		}
	}
	return 0;
}

/* A process's exit status as its parent's wait sees it, written as a shell does: the exit
 * status, or 128 + the signal that killed it. The group's status when it exited as a group
 * (exit_group, a fatal signal), else the leader's own. */
static __always_inline __s32 podscope_exit_code(struct task_struct *task)
{
	struct signal_struct *signal = BPF_CORE_READ(task, signal);
	int raw = (BPF_CORE_READ(signal, flags) & PODSCOPE_SIGNAL_GROUP_EXIT)
			  ? BPF_CORE_READ(signal, group_exit_code)
			  : BPF_CORE_READ(task, group_leader, exit_code);
	return (raw & 0x7f) ? 128 + (raw & 0x7f) : (raw >> 8) & 0xff;
}

static __always_inline int podscope_skip_current(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	return agent_tgid != 0 && tgid == agent_tgid;
}

static __always_inline __u32 podscope_log2(__u64 v)
{
	__u32 r = 0;
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) { r += 1; }
	return r;
}

static __always_inline void podscope_hist_add(struct podscope_hist *h, __u64 v)
{
	__sync_fetch_and_add(&h->sum, v);
	if (v == 0) {
		__sync_fetch_and_add(&h->zero_count, 1);
		return;
	}
	__u32 slot = v == 1 ? 0 : podscope_log2(v - 1) + 1;
	if (slot >= PODSCOPE_HIST_SLOTS) /* never true: the bound is for the verifier */
		slot = PODSCOPE_HIST_SLOTS - 1;
	__sync_fetch_and_add(&h->slots[slot], 1);
}

/* Adds one to `key`'s counter in `map` (map slot `slot`), creating it if absent. */
static __always_inline void podscope_count(void *map, __u32 slot, const void *key)
{
	__u64 *count = bpf_map_lookup_elem(map, key);
	if (count) {
		__sync_fetch_and_add(count, 1);
		return;
	}
	__u64 one = 1;
	if (podscope_insert(map, slot, key, &one, BPF_NOEXIST) != 0) {
		/* Another CPU created it first, or the map is full (counted). */
		count = bpf_map_lookup_elem(map, key);
		if (count)
			__sync_fetch_and_add(count, 1);
	}
}

/* A zeroed value for `key` in `map` (map slot `slot`), created if absent; NULL (and counted) when
 * the map has no room for it. */
static __always_inline void *podscope_lookup_or_init(void *map, __u32 slot, const void *key, const void *zero)
{
	void *value = bpf_map_lookup_elem(map, key);
	if (value)
		return value;
	podscope_insert(map, slot, key, zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(map, key);
}
#endif /* __BPF__ */

#endif /* PODSCOPE_H */
