// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * files: opens (every open syscall: open, creat, openat, openat2, open_by_handle_at) per cgroup
 * and result (0 or errno), and, with `capture_paths`,
 * opens per cgroup and path for the current interval (userspace reads and clears it).
 * The syscall numbers come from the loader, which takes them from the `syscalls` crate.
 * tp_btf: typed, direct access to the registers, no probe_read helper on the syscall path.
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

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct open_key);
	__type(value, __u64);
} opens SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct open_path_key);
	__type(value, __u64);
} open_paths SEC(".maps");

/* thread id → user pointer to the path being opened */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u64);
} open_inflight SEC(".maps");

/* Scratch space: a path key is too large for the BPF stack next to everything else. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct open_path_key);
} path_scratch SEC(".maps");

static __always_inline int is_open(long nr)
{
	__u32 n = (__u32)nr;
	return nr >= 0 && (n == nr_openat || n == nr_open || n == nr_openat2 || n == nr_creat ||
			   n == nr_open_by_handle_at);
}

SEC("tp_btf/sys_enter")
int BPF_PROG(podscope_files_enter, struct pt_regs *regs, long id)
{
	if (!capture_paths || !is_open(id) || podscope_skip_current())
		return 0;
	if (podscope_skip_cgroup(bpf_get_current_cgroup_id()))
		return 0;
	/* open_by_handle_at names no path. */
	if ((__u32)id == nr_open_by_handle_at)
		return 0;
	__u64 path = (__u32)id == nr_open || (__u32)id == nr_creat ? PODSCOPE_SYSCALL_ARG1(regs)
								 : PODSCOPE_SYSCALL_ARG2(regs);
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	podscope_insert(&open_inflight, FILES_MAP_INFLIGHT, &tid, &path, BPF_ANY);
	return 0;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(podscope_files_exit, struct pt_regs *regs, long ret)
{
	long nr = PODSCOPE_SYSCALL_NR(regs);
	if (!is_open(nr) || podscope_skip_current())
		return 0;
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	if (podscope_skip_cgroup(cgroup_id))
		return 0;
	struct open_key key = {
		.cgroup_id = cgroup_id,
		.err = (ret < 0 && ret >= -4095) ? (__u32)(-ret) : 0,
	};
	podscope_count(&opens, FILES_MAP_OPENS, &key);

	if (!capture_paths)
		return 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 *path = bpf_map_lookup_elem(&open_inflight, &tid);
	if (!path)
		return 0;
	__u64 user_path = *path;
	bpf_map_delete_elem(&open_inflight, &tid);
	if (key.err != 0)
		return 0;
	__u32 zero = 0;
	struct open_path_key *pk = bpf_map_lookup_elem(&path_scratch, &zero);
	if (!pk)
		return 0;
	__builtin_memset(pk, 0, sizeof(*pk));
	pk->cgroup_id = cgroup_id;
	if (bpf_probe_read_user_str(pk->path, sizeof(pk->path), (const void *)user_path) <= 0)
		return 0;
	podscope_count(&open_paths, FILES_MAP_PATHS, pk);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
