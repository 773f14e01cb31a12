// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * process: exec, fork (new processes, not threads) and exit (when the last thread of the process
 * is gone, with the exit status its parent sees and its lifetime) per cgroup, counted in maps; exec and exit also go out as events on a ring buffer so userspace can
 * keep a pid → cgroup table. Wake-ups are batched: userspace is woken only once
 * `wakeup_bytes` are waiting, and polls on a timer for the rest (see shared/notes: a wake-up per
 * event costs about three times more).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "podscope.h"

const volatile __u64 wakeup_bytes = 65536;
/* Keep each cgroup's distribution of process lifetimes (process_lifetime). */
const volatile __u32 measure_lifetime = 1;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct process_key);
	__type(value, __u64);
} process_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct podscope_hist);
} process_lifetime SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} process_events SEC(".maps");

/* Older kernels' exit program (below): groups whose last thread was counted, by signal struct. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 256);
	__type(key, __u64);
	__type(value, __u8);
} exited_groups SEC(".maps");

/* Events that did not fit in the ring buffer (index 0), summed over CPUs by userspace. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} process_events_lost SEC(".maps");

static struct podscope_hist zero_hist;

static __always_inline __u64 task_cgroup_id(struct task_struct *task)
{
	return BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
}

static __always_inline void emit(struct task_struct *task, __u64 cgroup_id, __u32 kind, __s32 exit_code, __u64 lifetime)
{
	struct process_event *e = bpf_ringbuf_reserve(&process_events, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&process_events_lost, &zero);
		if (lost)
			*lost += 1;
		return;
	}
	e->cgroup_id = cgroup_id;
	e->timestamp_ns = bpf_ktime_get_ns();
	e->lifetime_ns = lifetime;
	e->kind = kind;
	e->pid = BPF_CORE_READ(task, tgid);
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	e->exit_code = exit_code;
	bpf_probe_read_kernel_str(e->comm, sizeof(e->comm), task->comm);
	__u64 waiting = bpf_ringbuf_query(&process_events, BPF_RB_AVAIL_DATA);
	bpf_ringbuf_submit(e, waiting >= wakeup_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(podscope_process_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	if (podscope_skip_current())
		return 0;
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	if (podscope_skip_cgroup(cgroup_id))
		return 0;
	struct process_key key = { .cgroup_id = cgroup_id, .kind = PROCESS_EXEC };
	podscope_count(&process_counts, PROCESS_MAP_COUNTS, &key);
	emit(task, cgroup_id, PROCESS_EXEC, 0, 0);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(podscope_process_fork, struct task_struct *parent, struct task_struct *child)
{
	/* A new thread shares its parent's thread group: not a new process. */
	if (BPF_CORE_READ(child, pid) != BPF_CORE_READ(child, tgid))
		return 0;
	__u64 signal = (__u64)BPF_CORE_READ(child, signal);
	bpf_map_delete_elem(&exited_groups, &signal);
	if (podscope_skip_current())
		return 0;
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	if (podscope_skip_cgroup(cgroup_id))
		return 0;
	struct process_key key = { .cgroup_id = cgroup_id, .kind = PROCESS_FORK };
	podscope_count(&process_counts, PROCESS_MAP_COUNTS, &key);
	return 0;
}

/* A process's exit, once its last thread is gone (`task` is that thread). */
static __always_inline void count_process_exit(struct task_struct *task)
{
	if (podscope_skip_current())
		return;
	__u64 cgroup_id = task_cgroup_id(task);
	if (podscope_skip_cgroup(cgroup_id))
		return;
	__s32 code = podscope_exit_code(task);
	struct process_key key = { .cgroup_id = cgroup_id, .kind = PROCESS_EXIT, .exit_code = code };
	podscope_count(&process_counts, PROCESS_MAP_COUNTS, &key);

	__u64 now = bpf_ktime_get_ns();
	__u64 start = BPF_CORE_READ(task, group_leader, start_time);
	__u64 lifetime = now > start ? now - start : 0;
	if (measure_lifetime) {
		struct podscope_hist *h = podscope_lookup_or_init(&process_lifetime, PROCESS_MAP_LIFETIME, &cgroup_id, &zero_hist);
		if (h)
			podscope_hist_add(h, lifetime);
	}
	emit(BPF_CORE_READ(task, group_leader), cgroup_id, PROCESS_EXIT, code, lifetime);
}

/* Kernels whose tracepoint says whether the exiting thread was its group's last. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(podscope_process_exit, struct task_struct *task, bool group_dead)
{
	if (group_dead)
		count_process_exit(task);
	return 0;
}

/* Older kernels: the thread that finds no live thread left in its group exits it last.
 * Threads exiting at the same moment can all find none, so only the first of them whose
 * exited_groups record is new counts; a new process whose signal struct reuses the address clears
 * the record at fork. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(podscope_process_exit_last_live, struct task_struct *task)
{
	if (BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0;
	__u64 signal = (__u64)BPF_CORE_READ(task, signal);
	__u8 one = 1;
	if (bpf_map_update_elem(&exited_groups, &signal, &one, BPF_NOEXIST) == 0)
		count_process_exit(task);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
