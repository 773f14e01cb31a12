// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * syscalls: per cgroup and syscall number, the count, the errors (return value in
 * [-4095, -1]) and, when `measure_latency` is set, the enter → exit latency as a log2 histogram.
 *
 * Cost matters here: every syscall on the machine runs this. tp_btf gives typed, direct access to
 * the registers (no probe_read helper), the stats map is per-CPU (plain increments, no atomics),
 * and the entry timestamp lives in task storage (no hashing on the hot path).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "podscope.h"

const volatile __u32 measure_latency = 1;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct syscall_key);
	__type(value, struct syscall_stats);
} syscall_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} syscall_start SEC(".maps");

static struct syscall_stats zero_stats;

static __always_inline void hist_add_local(struct podscope_hist *h, __u64 v)
{
	/* Per-CPU value: no other CPU writes it. */
	h->sum += v;
	if (v == 0) {
		h->zero_count++;
		return;
	}
	__u32 slot = v == 1 ? 0 : podscope_log2(v - 1) + 1;
	if (slot >= PODSCOPE_HIST_SLOTS)
		slot = PODSCOPE_HIST_SLOTS - 1;
	h->slots[slot]++;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(podscope_sys_enter, struct pt_regs *regs, long id)
{
	if (podscope_skip_current() || podscope_skip_cgroup(bpf_get_current_cgroup_id()))
		return 0;
	__u64 *start = bpf_task_storage_get(&syscall_start, bpf_get_current_task_btf(), 0,
					    BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (start)
		*start = bpf_ktime_get_ns();
	return 0;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(podscope_sys_exit, struct pt_regs *regs, long ret)
{
	if (podscope_skip_current())
		return 0;
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	if (podscope_skip_cgroup(cgroup_id))
		return 0;
	long nr = regs->orig_ax;
	if (nr < 0)
		return 0;
	struct syscall_key key = { .cgroup_id = cgroup_id, .nr = (__u32)nr };
	struct syscall_stats *stats = podscope_lookup_or_init(&syscall_stats, &key, &zero_stats);
	if (!stats)
		return 0;
	stats->count++;
	if (ret < 0 && ret >= -4095)
		stats->errors++;
	if (measure_latency) {
		__u64 *start = bpf_task_storage_get(&syscall_start, bpf_get_current_task_btf(), 0, 0);
		if (start && *start) {
			__u64 now = bpf_ktime_get_ns();
			if (now > *start)
				hist_add_local(&stats->latency_ns, now - *start);
			*start = 0;
		}
	}
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
