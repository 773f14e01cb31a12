// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * syscalls: per cgroup and syscall number, the count, the errors (return value in
 * [-4095, -1]) and, when `measure_latency` is set, the enter → exit latency as a log2 histogram.
 *
 * With neither errors nor latency wanted, only `podscope_sys_count` runs, on entry.
 *
 * Cost matters here: every syscall on the machine runs this. tp_btf gives typed, direct access to
 * the registers (no probe_read helper); counts are per-CPU (plain increments, no atomics) in one
 * value per cgroup indexed by syscall number (one lookup, 8-byte key); the entry timestamp lives
 * in task storage (no hashing).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "podscope.h"

const volatile __u32 measure_latency = 1;
const volatile __u32 count_errors = 1;

/* Both per-CPU hashes stay preallocated: every syscall writes them, and a failed insert here is
 * counted (map_full) rather than allocated on the hot path. Their size is the next budget step. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct syscall_counts);
} syscall_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct syscall_key);
	__type(value, struct podscope_hist);
} syscall_latency SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} syscall_start SEC(".maps");

static struct syscall_counts zero_counts;
static struct podscope_hist zero_hist;

static __always_inline void hist_add_local(struct podscope_hist *h, __u64 v)
{
	/* Per-CPU value: no other CPU writes it. */
	h->sum += v;
	if (v == 0) {
		h->zero_count++;
		return;
	}
	__u32 slot = v == 1 ? 0 : podscope_log2(v - 1) + 1;
	if (slot >= PODSCOPE_HIST_SLOTS) /* never true: the bound is for the verifier */
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
	long nr = PODSCOPE_SYSCALL_NR(regs);
	if (nr < 0 || nr >= PODSCOPE_SYSCALL_SLOTS)
		return 0;
	struct syscall_counts *counts = podscope_lookup_or_init(&syscall_counts, SYSCALLS_MAP_COUNTS, &cgroup_id, &zero_counts);
	if (!counts)
		return 0;
	counts->count[nr]++;
	if (count_errors && ret < 0 && ret >= -4095)
		counts->errors[nr]++;
	if (measure_latency) {
		__u64 *start = bpf_task_storage_get(&syscall_start, bpf_get_current_task_btf(), 0, 0);
		if (start && *start) {
			__u64 now = bpf_ktime_get_ns();
			struct syscall_key key = { .cgroup_id = cgroup_id, .nr = (__u32)nr };
			struct podscope_hist *h = podscope_lookup_or_init(&syscall_latency, SYSCALLS_MAP_LATENCY, &key, &zero_hist);
			if (h && now > *start)
				hist_add_local(h, now - *start);
			*start = 0;
		}
	}
	return 0;
}

/* Counts only (no errors, no latency): one hook on entry, where the syscall number is an
 * argument. The cheapest way to count: the own-process check and the cgroup id are direct loads
 * from the current task (BTF-typed, no helper call each), and counts are per-CPU increments. */
SEC("tp_btf/sys_enter")
int BPF_PROG(podscope_sys_count, struct pt_regs *regs, long nr)
{
	struct task_struct *task = bpf_get_current_task_btf();
	if (agent_tgid != 0 && task->tgid == agent_tgid)
		return 0;
	__u64 cgroup_id = task->cgroups->dfl_cgrp->kn->id;
	if (podscope_skip_cgroup(cgroup_id))
		return 0;
	if (nr < 0 || nr >= PODSCOPE_SYSCALL_SLOTS)
		return 0;
	struct syscall_counts *counts = podscope_lookup_or_init(&syscall_counts, SYSCALLS_MAP_COUNTS, &cgroup_id, &zero_counts);
	if (counts)
		counts->count[nr]++;
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
