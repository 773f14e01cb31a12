// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sched: run-queue latency per cgroup (from the moment a task becomes runnable — woken, or
 * preempted while still runnable — to the moment it is switched in) as a log2 histogram, and
 * context switches per cgroup, voluntary (the task blocked) or involuntary (preempted).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "podscope.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct podscope_hist);
} runq_latency SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 8192);
	__type(key, struct switch_key);
	__type(value, __u64);
} context_switches SEC(".maps");

/* Per thread: when it became runnable (0: not waiting). Task storage, not a hash by thread id:
 * no hashing on every wakeup and context switch, and a thread's entry goes with the thread. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} runnable_since SEC(".maps");

static struct podscope_hist zero_hist;

static __always_inline __u64 task_cgroup_id(struct task_struct *task)
{
	return BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
}

static __always_inline int observed(struct task_struct *task, __u64 cgroup_id)
{
	__u32 tgid = BPF_CORE_READ(task, tgid);
	if (agent_tgid != 0 && tgid == agent_tgid)
		return 0;
	/* The idle task (pid 0) is not a workload. */
	if (BPF_CORE_READ(task, pid) == 0)
		return 0;
	return !podscope_skip_cgroup(cgroup_id);
}

static __always_inline void mark_runnable(struct task_struct *task)
{
	if (!observed(task, task_cgroup_id(task)))
		return;
	__u64 *since = bpf_task_storage_get(&runnable_since, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (since)
		*since = bpf_ktime_get_ns();
	else
		podscope_count_failed_insert(SCHED_MAP_RUNNABLE_SINCE);
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(podscope_sched_wakeup, struct task_struct *task)
{
	mark_runnable(task);
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(podscope_sched_wakeup_new, struct task_struct *task)
{
	mark_runnable(task);
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(podscope_sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next, unsigned int prev_state)
{
	__u64 prev_cgroup = task_cgroup_id(prev);
	if (observed(prev, prev_cgroup)) {
		/* TASK_RUNNING is 0: a task switched out while runnable was preempted. */
		int involuntary = preempt || prev_state == 0;
		struct switch_key key = {
			.cgroup_id = prev_cgroup,
			.kind = involuntary ? SWITCH_INVOLUNTARY : SWITCH_VOLUNTARY,
		};
		podscope_count(&context_switches, SCHED_MAP_SWITCHES, &key);
		if (involuntary)
			mark_runnable(prev);
	}

	__u64 next_cgroup = task_cgroup_id(next);
	if (!observed(next, next_cgroup))
		return 0;
	__u64 *since = bpf_task_storage_get(&runnable_since, next, 0, 0);
	if (!since || !*since)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	__u64 waited = now > *since ? now - *since : 0;
	*since = 0;
	struct podscope_hist *h = podscope_lookup_or_init(&runq_latency, SCHED_MAP_RUNQ_LATENCY, &next_cgroup, &zero_hist);
	if (h)
		podscope_hist_add(h, waited);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
