// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * syscalls: per cgroup and slot — a syscall's group, or the syscall itself, as the loader's
 * `slot_of` table says — the count, the errors (return value in [-4095, -1]) and optionally the
 * enter → exit latency as a log2 histogram.
 *
 * Cost matters here: every syscall on the machine runs one of these. Counting runs one program:
 * on exit (`podscope_sys_exit`, which sees the result: errors), or on entry (`podscope_sys_count`,
 * without errors). tp_btf gives typed, direct access to the registers and the current task (no
 * helper call for the own-process check or the cgroup id); counts are per-CPU (plain increments,
 * no atomics) in an entry per cgroup and slot, created at the first syscall of its kind.
 *
 * Latency needs the entry too. For every syscall, `podscope_sys_enter` runs on every syscall; for
 * a chosen few, `podscope_latency_enter` / `podscope_latency_exit` run on their per-syscall
 * tracepoints only (`syscalls:sys_enter_<name>`), so other syscalls pay nothing for it (without
 * tracefs, the first way, timing only those). Entry times live in task storage (no hashing, freed
 * with the task).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "podscope.h"

/* podscope_sys_enter runs (on every syscall) and podscope_sys_exit ends the timing. */
const volatile __u32 measure_latency = 0;
const volatile __u32 count_errors = 1;
/* The slot each syscall number is counted in (set by the loader): its group, or itself. */
const volatile __u16 slot_of[PODSCOPE_SYSCALL_NRS] = {};
/* The syscalls whose latency podscope_sys_enter / podscope_sys_exit time (1), when they run. */
const volatile __u8 timed[PODSCOPE_SYSCALL_NRS] = {};

/* Not preallocated: entries come and go with cgroups. The first syscall of a kind in a cgroup
 * creates its entry (measured in the paired bench: the per-syscall cost is the lookup). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct syscall_key);
	__type(value, struct syscall_counts);
} syscall_counts SEC(".maps");

/* One histogram per cgroup and slot, shared by the CPUs (atomic adds): a per-CPU histogram would
 * cost its 536 bytes on every CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 4096);
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

/* The current task's cgroup, or 0 when it is the agent or filtered out. Direct loads from the
 * BTF-typed task: no helper call on the hot path. */
static __always_inline __u64 observed_cgroup(struct task_struct *task)
{
	if (agent_tgid != 0 && task->tgid == agent_tgid)
		return 0;
	__u64 cgroup_id = task->cgroups->dfl_cgrp->kn->id;
	return podscope_skip_cgroup(cgroup_id) ? 0 : cgroup_id;
}

static __always_inline struct syscall_counts *counts_for(__u64 cgroup_id, long nr)
{
	if (nr < 0 || nr >= PODSCOPE_SYSCALL_NRS)
		return 0;
	struct syscall_key key = { .cgroup_id = cgroup_id, .slot = slot_of[nr] };
	return podscope_lookup_or_init(&syscall_counts, SYSCALLS_MAP_COUNTS, &key, &zero_counts);
}

static __always_inline void start_latency(void)
{
	__u64 *start = bpf_task_storage_get(&syscall_start, bpf_get_current_task_btf(), 0,
					    BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (start)
		*start = bpf_ktime_get_ns();
}

/* Adds the time since the current task's syscall entry to its cgroup's histogram for `nr`. */
static __always_inline void end_latency(__u64 cgroup_id, long nr)
{
	__u64 *start = bpf_task_storage_get(&syscall_start, bpf_get_current_task_btf(), 0, 0);
	if (!start || !*start || nr < 0 || nr >= PODSCOPE_SYSCALL_NRS)
		return;
	__u64 now = bpf_ktime_get_ns();
	struct syscall_key key = { .cgroup_id = cgroup_id, .slot = slot_of[nr] };
	struct podscope_hist *h = podscope_lookup_or_init(&syscall_latency, SYSCALLS_MAP_LATENCY, &key, &zero_hist);
	if (h && now > *start)
		podscope_hist_add(h, now - *start);
	*start = 0;
}

/* Counts, errors and (with measure_latency) latency, on exit. */
SEC("tp_btf/sys_exit")
int BPF_PROG(podscope_sys_exit, struct pt_regs *regs, long ret)
{
	__u64 cgroup_id = observed_cgroup(bpf_get_current_task_btf());
	if (!cgroup_id)
		return 0;
	long nr = PODSCOPE_SYSCALL_NR(regs);
	struct syscall_counts *counts = counts_for(cgroup_id, nr);
	if (counts) {
		counts->count++;
		if (count_errors && ret < 0 && ret >= -4095)
			counts->errors++;
	}
	if (measure_latency && nr >= 0 && nr < PODSCOPE_SYSCALL_NRS && timed[nr])
		end_latency(cgroup_id, nr);
	return 0;
}

/* Counts only (no errors): on entry, where the syscall number is an argument. */
SEC("tp_btf/sys_enter")
int BPF_PROG(podscope_sys_count, struct pt_regs *regs, long nr)
{
	__u64 cgroup_id = observed_cgroup(bpf_get_current_task_btf());
	if (!cgroup_id)
		return 0;
	struct syscall_counts *counts = counts_for(cgroup_id, nr);
	if (counts)
		counts->count++;
	return 0;
}

/* Entry times, on every syscall (measure_latency), of those `timed`: all of them, or the chosen
 * few when their own tracepoints cannot be used. */
SEC("tp_btf/sys_enter")
int BPF_PROG(podscope_sys_enter, struct pt_regs *regs, long nr)
{
	if (nr < 0 || nr >= PODSCOPE_SYSCALL_NRS || !timed[nr])
		return 0;
	if (observed_cgroup(bpf_get_current_task_btf()))
		start_latency();
	return 0;
}

/* The latency of chosen syscalls, on their own tracepoints (syscalls:sys_enter_<name>,
 * syscalls:sys_exit_<name>): other syscalls run neither. */
SEC("tracepoint")
int podscope_latency_enter(struct podscope_syscall_enter *ctx)
{
	if (observed_cgroup(bpf_get_current_task_btf()))
		start_latency();
	return 0;
}

SEC("tracepoint")
int podscope_latency_exit(struct podscope_syscall_exit *ctx)
{
	__u64 cgroup_id = observed_cgroup(bpf_get_current_task_btf());
	if (cgroup_id)
		end_latency(cgroup_id, ctx->nr);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
