// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * files: opens (every open syscall: open, creat, openat, openat2, open_by_handle_at) per cgroup
 * and result (0 or errno), and, with `capture_paths`, successful opens per cgroup and path for
 * each collection interval.
 *
 * Hooks: the open syscalls' own tracepoints (syscalls:sys_exit_openat, …) where tracefs can be
 * used, so no other syscall runs anything of this probe; else tp_btf on sys_enter/sys_exit,
 * which every syscall runs and which return at once for those that are not opens. The syscall
 * numbers come from the loader (the `syscalls` crate).
 *
 * Paths: counted in the collection epoch the agent names (`path_epoch`); the agent reads an epoch
 * a whole interval after the kernel moved on from it, so no count races its read and delete. Each
 * cgroup tracks at most `tracked_paths` distinct paths per epoch; opens of further paths (or of
 * paths the full map has no room for) go to the cgroup's `other` count, in the kernel.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "podscope.h"

/* The open syscalls' numbers; ~0 where the architecture lacks one. */
const volatile __u32 nr_open = ~0U;
const volatile __u32 nr_creat = ~0U;
const volatile __u32 nr_openat = ~0U;
const volatile __u32 nr_openat2 = ~0U;
const volatile __u32 nr_open_by_handle_at = ~0U;
const volatile __u32 capture_paths = 0;
const volatile __u32 tracked_paths = 64;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct open_key);
	__type(value, __u64);
} opens SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct open_path_key);
	__type(value, __u64);
} open_paths SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 4096);
	__type(key, struct open_path_key_cgroup);
	__type(value, struct open_path_cgroup);
} open_path_cgroups SEC(".maps");

/* Index 0: the epoch opens are counted in now (set by the agent). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} path_epoch SEC(".maps");

/* Per thread: the user pointer to the path being opened, from entry to exit. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} open_path_arg SEC(".maps");

/* Scratch space: a path key is too large for the BPF stack next to everything else. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct open_path_key);
} path_scratch SEC(".maps");

static struct open_path_cgroup zero_path_cgroup;

static __always_inline int is_open(long nr)
{
	__u32 n = (__u32)nr;
	return nr >= 0 && (n == nr_openat || n == nr_open || n == nr_openat2 || n == nr_creat ||
			   n == nr_open_by_handle_at);
}

/* The current task's cgroup, or 0 when it is the agent or filtered out. */
static __always_inline __u64 observed_cgroup(void)
{
	struct task_struct *task = bpf_get_current_task_btf();
	if (agent_tgid != 0 && task->tgid == agent_tgid)
		return 0;
	__u64 cgroup_id = task->cgroups->dfl_cgrp->kn->id;
	return podscope_skip_cgroup(cgroup_id) ? 0 : cgroup_id;
}

/* On entry of open syscall `nr` with arguments `arg0`, `arg1`: keep the path pointer. */
static __always_inline void note_path(long nr, __u64 arg0, __u64 arg1)
{
	/* open_by_handle_at names no path. */
	if (!capture_paths || (__u32)nr == nr_open_by_handle_at || !observed_cgroup())
		return;
	__u64 *arg = bpf_task_storage_get(&open_path_arg, bpf_get_current_task_btf(), 0,
					  BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (arg)
		*arg = (__u32)nr == nr_open || (__u32)nr == nr_creat ? arg0 : arg1;
}

/* A successful open of the path at `user_path` in `cgroup_id`: counted by path, or as other. */
static __always_inline void count_path(__u64 cgroup_id, __u64 user_path)
{
	__u32 zero = 0;
	__u32 *epoch = bpf_map_lookup_elem(&path_epoch, &zero);
	if (!epoch)
		return;
	struct open_path_key_cgroup ck = { .cgroup_id = cgroup_id, .epoch = *epoch };
	struct open_path_cgroup *cg = podscope_lookup_or_init(&open_path_cgroups, FILES_MAP_PATH_CGROUPS, &ck, &zero_path_cgroup);
	if (!cg)
		return;
	struct open_path_key *pk = bpf_map_lookup_elem(&path_scratch, &zero);
	if (!pk)
		return;
	__builtin_memset(pk, 0, sizeof(*pk));
	pk->cgroup_id = cgroup_id;
	pk->epoch = ck.epoch;
	if (!user_path || bpf_probe_read_user_str(pk->path, sizeof(pk->path), (const void *)user_path) <= 0)
		goto other;
	__u64 *count = bpf_map_lookup_elem(&open_paths, pk);
	if (count) {
		__sync_fetch_and_add(count, 1);
		return;
	}
	/* A path new to this cgroup and epoch: tracked while there is room (CPUs racing here may
	 * track a path or two beyond the limit; no count is lost either way). */
	if (cg->distinct >= tracked_paths)
		goto other;
	__sync_fetch_and_add(&cg->distinct, 1);
	__u64 one = 1;
	long err = podscope_insert(&open_paths, FILES_MAP_PATHS, pk, &one, BPF_NOEXIST);
	if (err == 0)
		return;
	if (err == -PODSCOPE_EEXIST) {
		count = bpf_map_lookup_elem(&open_paths, pk);
		if (count) {
			__sync_fetch_and_add(count, 1);
			return;
		}
	}
other:
	__sync_fetch_and_add(&cg->other, 1);
}

/* On exit of open syscall `nr` with result `ret`. */
static __always_inline void count_open(long nr, long ret)
{
	__u64 cgroup_id = observed_cgroup();
	if (!cgroup_id)
		return;
	struct open_key key = {
		.cgroup_id = cgroup_id,
		.err = (ret < 0 && ret >= -4095) ? (__u32)(-ret) : 0,
	};
	podscope_count(&opens, FILES_MAP_OPENS, &key);
	if (!capture_paths)
		return;
	__u64 user_path = 0;
	__u64 *arg = bpf_task_storage_get(&open_path_arg, bpf_get_current_task_btf(), 0, 0);
	if (arg) {
		user_path = *arg;
		*arg = 0;
	}
	if (key.err == 0 && (__u32)nr != nr_open_by_handle_at)
		count_path(cgroup_id, user_path);
}

/* The open syscalls' own tracepoints (attached to each of them). */
SEC("tracepoint")
int podscope_files_open_enter(struct podscope_syscall_enter *ctx)
{
	note_path(ctx->nr, ctx->args[0], ctx->args[1]);
	return 0;
}

SEC("tracepoint")
int podscope_files_open_exit(struct podscope_syscall_exit *ctx)
{
	count_open(ctx->nr, ctx->ret);
	return 0;
}

/* Without tracefs: every syscall's entry and exit. */
SEC("tp_btf/sys_enter")
int BPF_PROG(podscope_files_enter, struct pt_regs *regs, long id)
{
	if (is_open(id))
		note_path(id, PODSCOPE_SYSCALL_ARG1(regs), PODSCOPE_SYSCALL_ARG2(regs));
	return 0;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(podscope_files_exit, struct pt_regs *regs, long ret)
{
	long nr = PODSCOPE_SYSCALL_NR(regs);
	if (is_open(nr))
		count_open(nr, ret);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
