// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * syscount: system calls per container, syscall and result, for the pods an EbpfProgram's
 * podSelector picks (docs/programs.md). Build, without a Makefile:
 *
 *   bpftool btf dump file /sys/kernel/btf/vmlinux format c > vmlinux.h
 *   clang -g -O2 -target bpf -D__TARGET_ARCH_x86 -I. -c syscount.bpf.c -o syscount.bpf.o
 *   podscope program check syscount.bpf.o --spec syscount.yaml       # as root: verify, try
 *   kubectl create configmap podscope-programs -n observability --from-file=syscount.bpf.o
 *   kubectl apply -f syscount.yaml
 *
 * (clang 14 or newer and libbpf's headers: apt-get install clang libbpf-dev bpftool.)
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Set from the spec's globals: only syscalls slower than this are counted as slow. */
const volatile __u64 slow_ns = 1000000;

/* The agent keeps the cgroup ids of the selected pods here (the documented name). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u8);
} podscope_pods SEC(".maps");

struct call_key {
	__u64 cgroup_id;
	__u32 nr;
	__s32 err; /* 0, or the errno the call returned */
};

struct call_stats {
	__u64 calls;
	__u64 slow;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct call_key);
	__type(value, struct call_stats);
} calls SEC(".maps");

/* The call in progress per thread: when it started and which syscall it is. */
struct call_start {
	__u64 ns;
	__u32 nr;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct call_start);
} started SEC(".maps");

SEC("raw_tp/sys_enter")
int syscount_enter(void *ctx)
{
	__u64 cgroup = bpf_get_current_cgroup_id();
	if (!bpf_map_lookup_elem(&podscope_pods, &cgroup))
		return 0;
	/* raw_tp/sys_enter: args[0] the registers, args[1] the syscall number */
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct call_start start = { .ns = bpf_ktime_get_ns(), .nr = (__u32)((__u64 *)ctx)[1] };
	bpf_map_update_elem(&started, &tid, &start, BPF_ANY);
	return 0;
}

SEC("raw_tp/sys_exit")
int syscount_exit(void *ctx)
{
	/* raw_tp/sys_exit: args[0] the registers, args[1] the return value */
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct call_start *start = bpf_map_lookup_elem(&started, &tid);
	if (!start)
		return 0;
	__u64 took = bpf_ktime_get_ns() - start->ns;
	long ret = ((long *)ctx)[1];
	struct call_key key = {
		.cgroup_id = bpf_get_current_cgroup_id(),
		.nr = start->nr,
		.err = ret < 0 && ret >= -4095 ? (__s32)-ret : 0,
	};
	bpf_map_delete_elem(&started, &tid);
	struct call_stats zero = {}, *stats = bpf_map_lookup_elem(&calls, &key);
	if (!stats) {
		bpf_map_update_elem(&calls, &key, &zero, BPF_NOEXIST);
		stats = bpf_map_lookup_elem(&calls, &key);
		if (!stats)
			return 0;
	}
	stats->calls += 1;
	if (took >= slow_ns)
		stats->slow += 1;
	return 0;
}
