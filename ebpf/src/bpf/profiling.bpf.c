// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * profiling: stack samples of the observed cgroups' threads, unwound and aggregated in
 * userspace.
 *
 * On-CPU: a perf event program on each CPU's cpu-clock (at the configured frequency) records the
 * interrupted thread's kernel stack, its user registers and a copy of the top of its user stack
 * (16 KiB at most, page by page, not above the main thread's stack start). Userspace unwinds the
 * copy through the binaries' .eh_frame, so programs built without frame pointers unwind too.
 *
 * Off-CPU: sched_switch notes when an observed thread blocks; when it is switched in again after
 * at least `off_cpu_min_ns`, its kernel stack (still the one it blocked in) is kept as pending,
 * and at its next syscall exit — the first moment its own user stack is readable again, unchanged
 * since it blocked if the block was in that syscall — the pending block becomes a record with the
 * user stack. No kprobe is needed.
 *
 * Records go to one ring buffer; userspace is woken only once `wakeup_bytes` wait and reads on a
 * timer for the rest. A record that does not fit is counted in profile_lost.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "podscope.h"

#define PAGE_BYTES 4096
#define PF_KTHREAD_FLAG 0x00200000

const volatile __u64 wakeup_bytes = 512 << 10;
const volatile __u32 target_tgid = 0;     /* 0: every process; else only this one */
const volatile __u64 off_cpu_min_ns = 1000000;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} profile_samples SEC(".maps");

/* Records that did not fit in the ring buffer (index 0), summed over CPUs by userspace. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} profile_lost SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct profile_blocked);
} profile_blocked SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, struct profile_pending);
} profile_pending SEC(".maps");

/* Scratch for building a pending entry (too large for the BPF stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct profile_pending);
} profile_pending_scratch SEC(".maps");

static __always_inline int observed(struct task_struct *task)
{
	__u32 tgid = task->tgid;
	/* The idle task is not a workload; the agent never observes itself. */
	if (task->pid == 0 || (agent_tgid != 0 && tgid == agent_tgid))
		return 0;
	if (target_tgid != 0 && tgid != target_tgid)
		return 0;
	return 1;
}

static __always_inline __u64 task_cgroup(struct task_struct *task)
{
	return BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
}

static __always_inline void count_lost(void)
{
	__u32 zero = 0;
	__u64 *lost = bpf_map_lookup_elem(&profile_lost, &zero);
	if (lost)
		*lost += 1;
}

static __always_inline __u32 min_u32(__u32 a, __u32 b)
{
	return a < b ? a : b;
}

/* Copies [sp, sp + limit) of the current thread's user stack into s->ustack, as a ring over the
 * pages (see podscope.h): every read stays within one page, so an unmapped page only ends the
 * copy, and every offset is one the verifier can bound. Returns the bytes copied from sp up. */
static __always_inline __u32 copy_user_stack(struct profile_sample *s, __u64 sp, __u32 limit)
{
	__u32 head = sp & (PAGE_BYTES - 1);      /* sp's offset in its page */
	__u32 first = PAGE_BYTES - head;         /* 1..4096 bytes up to the page's end */
	__u32 copied = 0;
	__u32 len = min_u32(first, limit);
	if (len > PAGE_BYTES)
		return 0;
	if (bpf_probe_read_user(&s->ustack[head & (PAGE_BYTES - 1)], len, (void *)sp))
		return 0;
	copied = len;
#pragma unroll
	for (int page = 1; page < PODSCOPE_PROFILE_USTACK_BYTES / PAGE_BYTES; page++) {
		if (copied >= limit)
			return copied;
		len = min_u32(PAGE_BYTES, limit - copied);
		if (len > PAGE_BYTES)
			return copied;
		if (bpf_probe_read_user(&s->ustack[page * PAGE_BYTES], len, (void *)(sp + copied)))
			return copied;
		copied += len;
	}
	/* The rest lies in the page after the last one, in the ring's first `head` bytes. */
	if (copied >= limit)
		return copied;
	len = min_u32(head, limit - copied);
	if (len > PAGE_BYTES - 1)
		return copied;
	if (bpf_probe_read_user(&s->ustack[0], len, (void *)(sp + copied)))
		return copied;
	return copied + len;
}

/* The current thread's user registers and the top of its user stack, if it has a user side. */
static __always_inline void copy_user(struct profile_sample *s, struct task_struct *task)
{
	if (!task->mm || (task->flags & PF_KTHREAD_FLAG))
		return;
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	if (!regs)
		return;
	s->head.user_ip = regs->ip;
	s->head.user_sp = regs->sp;
	s->head.user_bp = regs->bp;
	s->head.flags |= PROFILE_USER_REGS;
	__u32 limit = PODSCOPE_PROFILE_USTACK_BYTES;
	/* The main thread's frames end at the stack's start; above it lie argv and the environment. */
	if (task->pid == task->tgid) {
		__u64 start = BPF_CORE_READ(task, mm, start_stack);
		if (start > s->head.user_sp && start - s->head.user_sp < limit)
			limit = start - s->head.user_sp;
	}
	s->head.ustack_bytes = copy_user_stack(s, s->head.user_sp, limit);
}

static __always_inline struct profile_sample *new_sample(struct task_struct *task, __u64 cgroup_id, __u32 kind)
{
	struct profile_sample *s = bpf_ringbuf_reserve(&profile_samples, sizeof(*s), 0);
	if (!s) {
		count_lost();
		return 0;
	}
	s->head.cgroup_id = cgroup_id;
	s->head.timestamp_ns = bpf_ktime_get_ns();
	s->head.off_cpu_ns = 0;
	s->head.user_ip = 0;
	s->head.user_sp = 0;
	s->head.user_bp = 0;
	s->head.exec_id = BPF_CORE_READ(task, self_exec_id);
	s->head.pid = task->tgid;
	s->head.tid = task->pid;
	s->head.kind = kind;
	s->head.flags = 0;
	s->head.kstack_bytes = 0;
	s->head.ustack_bytes = 0;
	bpf_probe_read_kernel_str(s->head.comm, sizeof(s->head.comm), task->comm);
	return s;
}

static __always_inline void submit(struct profile_sample *s)
{
	__u64 waiting = bpf_ringbuf_query(&profile_samples, BPF_RB_AVAIL_DATA);
	bpf_ringbuf_submit(s, waiting >= wakeup_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

SEC("perf_event")
int podscope_profile_cpu(struct bpf_perf_event_data *ctx)
{
	struct task_struct *task = bpf_get_current_task_btf();
	if (!observed(task))
		return 0;
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	if (podscope_skip_cgroup(cgroup_id))
		return 0;
	struct profile_sample *s = new_sample(task, cgroup_id, PROFILE_ON_CPU);
	if (!s)
		return 0;
	long kbytes = bpf_get_stack(ctx, s->head.kstack, sizeof(s->head.kstack), 0);
	s->head.kstack_bytes = kbytes > 0 ? kbytes : 0;
	copy_user(s, task);
	submit(s);
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(podscope_profile_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	__u64 now = bpf_ktime_get_ns();
	/* prev blocks (a voluntary switch): note when, and its user registers. */
	if (!preempt && prev->__state != 0 && observed(prev) && !podscope_skip_cgroup(task_cgroup(prev))) {
		struct profile_blocked *b = bpf_task_storage_get(&profile_blocked, prev, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
		if (b) {
			b->since_ns = now;
			b->user_ip = 0;
			b->user_sp = 0;
			if (prev->mm && !(prev->flags & PF_KTHREAD_FLAG)) {
				struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(prev);
				if (regs) {
					b->user_ip = regs->ip;
					b->user_sp = regs->sp;
				}
			}
		} else {
			podscope_count_failed_insert(PROFILING_MAP_BLOCKED);
		}
	}
	/* next comes back from a block: long enough to keep? */
	struct profile_blocked *b = bpf_task_storage_get(&profile_blocked, next, 0, 0);
	if (!b || b->since_ns == 0)
		return 0;
	__u64 blocked = now - b->since_ns;
	b->since_ns = 0;
	if (blocked < off_cpu_min_ns)
		return 0;
	__u32 tid = next->pid;
	struct profile_pending *p = bpf_map_lookup_elem(&profile_pending, &tid);
	if (p) {
		/* Blocked again before its syscall returned: the same user stack, time summed. */
		__sync_fetch_and_add(&p->off_cpu_ns, blocked);
		return 0;
	}
	__u32 zero = 0;
	p = bpf_map_lookup_elem(&profile_pending_scratch, &zero);
	if (!p)
		return 0;
	p->off_cpu_ns = blocked;
	p->user_ip = b->user_ip;
	p->user_sp = b->user_sp;
	long kbytes = bpf_get_task_stack(next, p->kstack, sizeof(p->kstack), 0);
	p->kstack_bytes = kbytes > 0 ? kbytes : 0;
	podscope_insert(&profile_pending, PROFILING_MAP_PENDING, &tid, p, BPF_NOEXIST);
	return 0;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(podscope_profile_sys_exit, struct pt_regs *regs, long ret)
{
	struct task_struct *task = bpf_get_current_task_btf();
	__u32 tid = task->pid;
	struct profile_pending *p = bpf_map_lookup_elem(&profile_pending, &tid);
	if (!p)
		return 0;
	struct profile_sample *s = new_sample(task, bpf_get_current_cgroup_id(), PROFILE_OFF_CPU);
	if (s) {
		s->head.off_cpu_ns = p->off_cpu_ns;
		__u32 kbytes = p->kstack_bytes;
		if (kbytes > sizeof(s->head.kstack))
			kbytes = sizeof(s->head.kstack);
		bpf_probe_read_kernel(s->head.kstack, sizeof(s->head.kstack), p->kstack);
		s->head.kstack_bytes = kbytes;
		struct pt_regs *user = (struct pt_regs *)bpf_task_pt_regs(task);
		/* Only if the thread's user registers are those it blocked with: a block outside a
		 * syscall (a page fault) reaches this only after other user code ran. */
		if (user && user->ip == p->user_ip && user->sp == p->user_sp)
			copy_user(s, task);
		else
			s->head.flags |= PROFILE_USER_STALE;
		submit(s);
	}
	bpf_map_delete_elem(&profile_pending, &tid);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
