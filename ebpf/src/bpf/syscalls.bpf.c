// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * syscalls: per cgroup and syscall number, the count, the errors (return value in
 * [-4095, -1]) and, when `measure_latency` is set, the enter → exit latency as a log2 histogram.
 * raw_tp hooks: the cheapest way onto the syscall path (see shared/notes).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "podscope.h"

const volatile __u32 measure_latency = 1;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct syscall_key);
	__type(value, struct syscall_stats);
} syscall_stats SEC(".maps");

/* thread id → enter timestamp */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u64);
} syscall_start SEC(".maps");

static struct syscall_stats zero_stats;

SEC("raw_tp/sys_enter")
int podscope_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
	if (!measure_latency || podscope_skip_current())
		return 0;
	if (podscope_skip_cgroup(bpf_get_current_cgroup_id()))
		return 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 now = bpf_ktime_get_ns();
	bpf_map_update_elem(&syscall_start, &tid, &now, BPF_ANY);
	return 0;
}

SEC("raw_tp/sys_exit")
int podscope_sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
	if (podscope_skip_current())
		return 0;
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	if (podscope_skip_cgroup(cgroup_id))
		return 0;
	struct pt_regs *regs = (struct pt_regs *)podscope_raw_arg(ctx, 0);
	long ret = (long)podscope_raw_arg(ctx, 1);
	long nr = BPF_CORE_READ(regs, orig_ax);
	if (nr < 0)
		return 0;
	struct syscall_key key = { .cgroup_id = cgroup_id, .nr = (__u32)nr };
	struct syscall_stats *stats = podscope_lookup_or_init(&syscall_stats, &key, &zero_stats);
	if (!stats)
		return 0;
	__sync_fetch_and_add(&stats->count, 1);
	if (ret < 0 && ret >= -4095)
		__sync_fetch_and_add(&stats->errors, 1);
	if (measure_latency) {
		__u32 tid = (__u32)bpf_get_current_pid_tgid();
		__u64 *start = bpf_map_lookup_elem(&syscall_start, &tid);
		if (start) {
			__u64 now = bpf_ktime_get_ns();
			if (now > *start)
				podscope_hist_add(&stats->latency_ns, now - *start);
			bpf_map_delete_elem(&syscall_start, &tid);
		}
	}
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
