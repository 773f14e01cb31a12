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
 * slot k is the OTLP exponential-histogram (scale 0) bucket index k - 1. Zeros are counted apart. */
#define PODSCOPE_HIST_SLOTS 48

struct podscope_hist {
	__u64 zero_count;
	__u64 sum;
	__u64 slots[PODSCOPE_HIST_SLOTS];
};

/* syscalls probe. Counts live in one value per cgroup, indexed by syscall number, so the hot
 * path does one lookup on an 8-byte key; latency histograms are per cgroup and syscall. */
#define PODSCOPE_SYSCALL_SLOTS 512

struct syscall_counts {
	__u64 count[PODSCOPE_SYSCALL_SLOTS];
	__u64 errors[PODSCOPE_SYSCALL_SLOTS];
};

struct syscall_key {
	__u64 cgroup_id;
	__u32 nr;
	__u32 _pad;
};

/* files probe: opens per cgroup and result (0 = success, else errno). */
struct open_key {
	__u64 cgroup_id;
	__u32 err;
	__u32 _pad;
};

#define PODSCOPE_PATH_LEN 128

struct open_path_key {
	__u64 cgroup_id;
	__u8 path[PODSCOPE_PATH_LEN];
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
 * bytes). One object is loaded per configured uprobe. */
#define PODSCOPE_UPROBE_VALUE_LEN 256

struct uprobe_key {
	__u64 cgroup_id;
	__u32 pid;
	__u32 value_len;
	__u8 value[PODSCOPE_UPROBE_VALUE_LEN];
};

/* tcp probe: per cgroup (the socket's) and peer. */
enum tcp_role {
	TCP_ROLE_CLIENT = 1, /* active open: connect() */
	TCP_ROLE_SERVER = 2, /* passive open: accept() */
};

struct podscope_tcp_key {
	__u64 cgroup_id;
	__u8 peer[16];     /* IPv4 in the first 4 bytes */
	__u16 server_port; /* the peer's port for clients, the local port for servers */
	__u8 family;       /* AF_INET 2, AF_INET6 10 */
	__u8 role;
	__u32 _pad;
};

struct podscope_tcp_stats {
	__u64 opened;
	__u64 closed;
	__u64 failed_refused;
	__u64 failed_timeout;
	__u64 failed_reset;
	__u64 failed_other;
	__u64 bytes_sent;
	__u64 bytes_received;
	__u64 retransmits;
	struct podscope_hist duration_ns;
	struct podscope_hist srtt_ns; /* smoothed RTT at close */
};

#ifdef __BPF__
/* ---- kernel side only ---- */

/* The syscall number and arguments in the registers saved at syscall entry (struct pt_regs of
 * tp_btf sys_enter / sys_exit). Written for x86_64 only: another architecture needs its own. */
#if defined(__TARGET_ARCH_x86)
#define PODSCOPE_SYSCALL_NR(regs) ((regs)->orig_ax)
#define PODSCOPE_SYSCALL_ARG2(regs) ((regs)->si)
#else
#error "podscope.h: the syscall-argument register access is written for x86_64 only"
#endif

/* Set by the loader. */
const volatile __u32 agent_tgid = 0;   /* never observe the agent itself */
const volatile __u32 filter_mode = 0;  /* 0 all cgroups, 1 only those in cgroup_filter, 2 all but those */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u8);
} cgroup_filter SEC(".maps");

static __always_inline int podscope_skip_cgroup(__u64 cgroup_id)
{
	if (filter_mode == 0)
		return 0;
	int listed = bpf_map_lookup_elem(&cgroup_filter, &cgroup_id) != 0;
	return filter_mode == 1 ? !listed : listed;
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
	if (slot >= PODSCOPE_HIST_SLOTS)
		slot = PODSCOPE_HIST_SLOTS - 1;
	__sync_fetch_and_add(&h->slots[slot], 1);
}

static __always_inline void podscope_count(void *map, const void *key)
{
	__u64 *count = bpf_map_lookup_elem(map, key);
	if (count) {
		__sync_fetch_and_add(count, 1);
		return;
	}
	__u64 one = 1;
	if (bpf_map_update_elem(map, key, &one, BPF_NOEXIST) != 0) {
		/* Another CPU created it first. */
		count = bpf_map_lookup_elem(map, key);
		if (count)
			__sync_fetch_and_add(count, 1);
	}
}

/* A zeroed value for `key` in `map`, created if absent. */
static __always_inline void *podscope_lookup_or_init(void *map, const void *key, const void *zero)
{
	void *value = bpf_map_lookup_elem(map, key);
	if (value)
		return value;
	bpf_map_update_elem(map, key, zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(map, key);
}
#endif /* __BPF__ */

#endif /* PODSCOPE_H */
