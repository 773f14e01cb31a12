// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * trace: the event probes of `kubectl podscope trace` (the `session` extension), one program per
 * probe, each attached only while a session asks for it. Events are filtered here, in the kernel,
 * to the cgroups the sessions trace: trace_cgroups maps a cgroup to the mask of the sessions
 * tracing it, trace_probe_sessions says which sessions asked for each probe (and which of them
 * trace the whole node). An event nobody asked for costs a map lookup and no ring-buffer record.
 *
 * Events go out once, with the mask of the sessions they are for; what does not fit in the ring
 * buffer is counted per session (trace_lost, by session slot), never dropped silently. Wake-ups
 * are batched (`wakeup_bytes`), the agent also polls on a short timer.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "podscope.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

const volatile __u64 wakeup_bytes = 16384;
/* The openat syscall's number (x86_64: 257), set by the loader. */
const volatile __u32 nr_openat = 257;

/* cgroup id -> sessions tracing it (written by the agent only) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u64);
} trace_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TRACE_PROBES);
	__type(key, __u32);
	__type(value, struct podscope_trace_probe_sessions);
} trace_probe_sessions SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} trace_events SEC(".maps");

/* Events the ring buffer had no room for, per session slot, summed over CPUs by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PODSCOPE_TRACE_MAX_SESSIONS);
	__type(key, __u32);
	__type(value, __u64);
} trace_lost SEC(".maps");

/* openat in flight: thread id -> its path pointer and flags, from entry to exit */
struct trace_open_arg {
	__u64 path;
	__u32 flags;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct trace_open_arg);
} trace_open_args SEC(".maps");

/* socket -> when it was established (tcp close's duration) and its local port then (at close
 * the kernel has already released it: skc_num reads 0) */
struct trace_tcp_live {
	__u64 since_ns;
	__u16 sport;
	__u8 _pad[6];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct trace_tcp_live);
} trace_tcp_live SEC(".maps");

/* A connect() in progress: socket -> the task that called it (the handshake completes in softirq
 * context, on whatever task was interrupted). */
struct trace_tcp_owner {
	__u32 pid;
	__u32 tid;
	__u8 comm[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct trace_tcp_owner);
} trace_tcp_connecting SEC(".maps");

/* The sessions that want an event of `probe` in `cgroup_id`; 0 for none. */
static __always_inline __u64 sessions_for(__u32 probe, __u64 cgroup_id)
{
	struct podscope_trace_probe_sessions *wanted = bpf_map_lookup_elem(&trace_probe_sessions, &probe);
	if (!wanted || !wanted->subscribed)
		return 0;
	__u64 mask = wanted->whole_node;
	__u64 *cgroup_mask = bpf_map_lookup_elem(&trace_cgroups, &cgroup_id);
	if (cgroup_mask)
		mask |= *cgroup_mask;
	return mask & wanted->subscribed;
}

static __always_inline void count_lost(__u64 sessions)
{
	for (__u32 slot = 0; slot < PODSCOPE_TRACE_MAX_SESSIONS; slot++) {
		if (!(sessions & (1ULL << slot)))
			continue;
		__u64 *lost = bpf_map_lookup_elem(&trace_lost, &slot);
		if (lost)
			*lost += 1;
	}
}

/* A zeroed event for `sessions`, or NULL (counted as lost) when the ring buffer is full. */
static __always_inline struct podscope_trace_event *reserve(__u32 probe, __u64 sessions, __u64 cgroup_id)
{
	struct podscope_trace_event *e = bpf_ringbuf_reserve(&trace_events, sizeof(*e), 0);
	if (!e) {
		count_lost(sessions);
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->sessions = sessions;
	e->cgroup_id = cgroup_id;
	e->timestamp_ns = bpf_ktime_get_ns();
	e->probe = probe;
	return e;
}

static __always_inline void submit(struct podscope_trace_event *e)
{
	__u64 waiting = bpf_ringbuf_query(&trace_events, BPF_RB_AVAIL_DATA);
	bpf_ringbuf_submit(e, waiting >= wakeup_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

/* pid, tid and comm of the current task. */
static __always_inline void current_task(struct podscope_trace_event *e)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->flags |= TRACE_FLAG_TASK;
}

static __always_inline void task_into(struct podscope_trace_event *e, struct task_struct *task)
{
	e->pid = BPF_CORE_READ(task, tgid);
	e->tid = BPF_CORE_READ(task, pid);
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	BPF_CORE_READ_STR_INTO(&e->comm, task, comm);
	e->flags |= TRACE_FLAG_TASK;
}

static __always_inline __u64 task_cgroup(struct task_struct *task)
{
	return BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(podscope_trace_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	if (podscope_skip_current())
		return 0;
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	__u64 sessions = sessions_for(TRACE_EXEC, cgroup_id);
	if (!sessions)
		return 0;
	struct podscope_trace_event *e = reserve(TRACE_EXEC, sessions, cgroup_id);
	if (!e)
		return 0;
	task_into(e, task);
	bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), BPF_CORE_READ(bprm, filename));
	/* The new program's arguments are in place in its memory by now. */
	unsigned long arg_start = BPF_CORE_READ(task, mm, arg_start);
	if (arg_start)
		bpf_probe_read_user_str(e->argv0, sizeof(e->argv0), (const void *)arg_start);
	submit(e);
	return 0;
}

/* As the process probe (and a shell) reports it: the exit status, or 128 + the killing signal. */
static __always_inline __s32 exit_code_of(struct task_struct *task)
{
	struct signal_struct *signal = BPF_CORE_READ(task, signal);
	int raw = (BPF_CORE_READ(signal, flags) & PODSCOPE_SIGNAL_GROUP_EXIT)
			  ? BPF_CORE_READ(signal, group_exit_code)
			  : BPF_CORE_READ(task, group_leader, exit_code);
	return (raw & 0x7f) ? 128 + (raw & 0x7f) : (raw >> 8) & 0xff;
}

/* A process's exit, once its last thread is gone. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(podscope_trace_exit, struct task_struct *task, bool group_dead)
{
	if (!group_dead || podscope_skip_current())
		return 0;
	__u64 cgroup_id = task_cgroup(task);
	__u64 sessions = sessions_for(TRACE_EXIT, cgroup_id);
	if (!sessions)
		return 0;
	struct podscope_trace_event *e = reserve(TRACE_EXIT, sessions, cgroup_id);
	if (!e)
		return 0;
	struct task_struct *leader = BPF_CORE_READ(task, group_leader);
	task_into(e, leader);
	e->exit_code = exit_code_of(task);
	__u64 start = BPF_CORE_READ(leader, start_time);
	e->duration_ns = e->timestamp_ns > start ? e->timestamp_ns - start : 0;
	e->flags |= TRACE_FLAG_DURATION;
	submit(e);
	return 0;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(podscope_trace_open_enter, struct pt_regs *regs, long id)
{
	if (id != nr_openat || podscope_skip_current())
		return 0;
	if (!sessions_for(TRACE_OPEN, bpf_get_current_cgroup_id()))
		return 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	/* openat(dirfd, path, flags, mode) */
	struct trace_open_arg arg = {
		.path = PODSCOPE_SYSCALL_ARG2(regs),
		.flags = (__u32)regs->dx,
	};
	podscope_insert(&trace_open_args, TRACE_MAP_OPEN_ARGS, &tid, &arg, BPF_ANY);
	return 0;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(podscope_trace_open_exit, struct pt_regs *regs, long ret)
{
	if (PODSCOPE_SYSCALL_NR(regs) != nr_openat)
		return 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct trace_open_arg *found = bpf_map_lookup_elem(&trace_open_args, &tid);
	if (!found)
		return 0;
	struct trace_open_arg arg = *found;
	bpf_map_delete_elem(&trace_open_args, &tid);
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	__u64 sessions = sessions_for(TRACE_OPEN, cgroup_id);
	if (!sessions)
		return 0;
	struct podscope_trace_event *e = reserve(TRACE_OPEN, sessions, cgroup_id);
	if (!e)
		return 0;
	current_task(e);
	e->result = ret;
	e->open_flags = arg.flags;
	bpf_probe_read_user_str(e->filename, sizeof(e->filename), (const void *)arg.path);
	submit(e);
	return 0;
}

static __always_inline int tcp_addresses(const struct sock *sk, struct podscope_trace_event *e)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return -1;
	e->family = family;
	e->sport = BPF_CORE_READ(sk, __sk_common.skc_num);
	e->dport = __builtin_bswap16(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (family == AF_INET) {
		__u32 saddr = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__u32 daddr = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		__builtin_memcpy(e->saddr, &saddr, 4);
		__builtin_memcpy(e->daddr, &daddr, 4);
	} else {
		BPF_CORE_READ_INTO(&e->saddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&e->daddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	}
	return 0;
}

/* The current task is the socket's process only when it runs in the socket's cgroup: state
 * changes also run in softirq context, on whatever task was interrupted. */
static __always_inline void socket_task(struct podscope_trace_event *e, __u64 socket_cgroup)
{
	if (bpf_get_current_cgroup_id() == socket_cgroup)
		current_task(e);
}

/* An event of `probe` on socket `sk`, for the task `owner` (NULL: the current task when it runs
 * in the socket's cgroup). */
static __always_inline void tcp_event(const struct sock *sk, __u32 probe, __u64 cgroup_id, __u64 duration, __u32 flags,
				      const struct trace_tcp_owner *owner, __s64 result, __u16 sport)
{
	__u64 sessions = sessions_for(probe, cgroup_id);
	if (!sessions)
		return;
	struct podscope_trace_event *e = reserve(probe, sessions, cgroup_id);
	if (!e)
		return;
	if (tcp_addresses(sk, e)) {
		bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
		return;
	}
	if (owner) {
		e->pid = owner->pid;
		e->tid = owner->tid;
		__builtin_memcpy(e->comm, owner->comm, sizeof(e->comm));
		e->flags |= TRACE_FLAG_TASK;
	} else {
		socket_task(e, cgroup_id);
	}
	if (sport)
		e->sport = sport;
	e->duration_ns = duration;
	e->flags |= flags;
	e->result = result;
	submit(e);
}

/* connect: the handshake completed (or failed), for the task that called connect() (recorded
 * when the SYN went out); accept: the handshake completed on the server side; close: the socket
 * reaches CLOSE from a state past the handshake. */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(podscope_trace_tcp_state, const struct sock *sk, const int oldstate, const int newstate)
{
	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	__u64 cgroup_id = BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);
	__u64 id = (__u64)sk;
	if (newstate == TCP_SYN_SENT) {
		if (!sessions_for(TRACE_TCP_CONNECT, cgroup_id))
			return 0;
		struct trace_tcp_owner owner = {};
		__u64 pid_tgid = bpf_get_current_pid_tgid();
		owner.pid = pid_tgid >> 32;
		owner.tid = (__u32)pid_tgid;
		bpf_get_current_comm(owner.comm, sizeof(owner.comm));
		podscope_insert(&trace_tcp_connecting, TRACE_MAP_TCP_CONNECTING, &id, &owner, BPF_ANY);
		return 0;
	}
	if (oldstate == TCP_SYN_SENT) {
		struct trace_tcp_owner *found = bpf_map_lookup_elem(&trace_tcp_connecting, &id);
		if (found) {
			struct trace_tcp_owner owner = *found;
			bpf_map_delete_elem(&trace_tcp_connecting, &id);
			__s64 result = newstate == TCP_ESTABLISHED ? 0 : -(__s64)BPF_CORE_READ(sk, sk_err);
			tcp_event(sk, TRACE_TCP_CONNECT, cgroup_id, 0, 0, &owner, result, 0);
		}
	}
	if (newstate == TCP_ESTABLISHED) {
		if (!sessions_for(TRACE_TCP_CLOSE, cgroup_id) && !sessions_for(TRACE_TCP_ACCEPT, cgroup_id))
			return 0;
		struct trace_tcp_live live = {
			.since_ns = bpf_ktime_get_ns(),
			.sport = BPF_CORE_READ(sk, __sk_common.skc_num),
		};
		podscope_insert(&trace_tcp_live, TRACE_MAP_TCP_LIVE, &id, &live, BPF_ANY);
		if (oldstate == TCP_SYN_RECV)
			tcp_event(sk, TRACE_TCP_ACCEPT, cgroup_id, 0, 0, 0, 0, 0);
		return 0;
	}
	if (newstate != TCP_CLOSE)
		return 0;
	struct trace_tcp_live *found = bpf_map_lookup_elem(&trace_tcp_live, &id);
	__u64 duration = 0;
	__u32 flags = 0;
	__u16 sport = 0;
	if (found) {
		__u64 now = bpf_ktime_get_ns();
		duration = now > found->since_ns ? now - found->since_ns : 0;
		sport = found->sport;
		flags = TRACE_FLAG_DURATION;
		bpf_map_delete_elem(&trace_tcp_live, &id);
	}
	if (oldstate == TCP_SYN_SENT || oldstate == TCP_SYN_RECV || oldstate == TCP_LISTEN)
		return 0;
	tcp_event(sk, TRACE_TCP_CLOSE, cgroup_id, duration, flags, 0, 0, sport);
	return 0;
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(podscope_trace_tcp_retransmit, const struct sock *sk, const struct sk_buff *skb)
{
	__u64 cgroup_id = BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);
	tcp_event(sk, TRACE_TCP_RETRANSMIT, cgroup_id, 0, 0, 0, 0, 0);
	return 0;
}

/* The OOM killer chose `task` (in the victim's cgroup); the current task is the one whose
 * allocation ran out of memory. */
SEC("tp_btf/mark_victim")
int BPF_PROG(podscope_trace_oom_kill, struct task_struct *task, uid_t uid)
{
	__u64 cgroup_id = task_cgroup(task);
	__u64 sessions = sessions_for(TRACE_OOM_KILL, cgroup_id);
	if (!sessions)
		return 0;
	struct podscope_trace_event *e = reserve(TRACE_OOM_KILL, sessions, cgroup_id);
	if (!e)
		return 0;
	task_into(e, task);
	e->sender_pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(e->sender_comm, sizeof(e->sender_comm));
	submit(e);
	return 0;
}

/* A signal generated for `task` (matched on the target's cgroup), sent by the current task. */
SEC("tp_btf/signal_generate")
int BPF_PROG(podscope_trace_signal, int sig, struct kernel_siginfo *info, struct task_struct *task, int group, int result)
{
	__u64 cgroup_id = task_cgroup(task);
	__u64 sessions = sessions_for(TRACE_SIGNAL, cgroup_id);
	if (!sessions)
		return 0;
	struct podscope_trace_event *e = reserve(TRACE_SIGNAL, sessions, cgroup_id);
	if (!e)
		return 0;
	task_into(e, task);
	e->signal = sig;
	e->result = result;
	e->sender_pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(e->sender_comm, sizeof(e->sender_comm));
	submit(e);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
