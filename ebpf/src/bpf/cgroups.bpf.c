// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroups: not a probe, the receiver's record of removed cgroups. The receiver walks the cgroup
 * tree at each collection; a container that lived less than one interval (a Job, an init
 * container, a crash loop) is gone by then, and so is its path. Each cgroup v2 directory removed
 * leaves its id and path here until the receiver reads them, so the probes' data for it is still
 * reported with its identity.
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
	__type(value, struct removed_cgroup);
} removed_cgroups SEC(".maps");

/* A path being read: too large for the BPF stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct removed_cgroup);
} removed_scratch SEC(".maps");

SEC("tp_btf/cgroup_rmdir")
int BPF_PROG(podscope_cgroup_rmdir, struct cgroup *cgrp, const char *path)
{
	/* cgroup v1 hierarchies have their own ids; the probes see the v2 (default) one's, id 0. */
	if (BPF_CORE_READ(cgrp, root, hierarchy_id) != 0)
		return 0;
	__u32 zero = 0;
	struct removed_cgroup *removed = bpf_map_lookup_elem(&removed_scratch, &zero);
	if (!removed)
		return 0;
	if (bpf_probe_read_kernel_str(removed->path, sizeof(removed->path), path) <= 0)
		return 0;
	__u64 id = BPF_CORE_READ(cgrp, kn, id);
	podscope_insert(&removed_cgroups, CGROUPS_MAP_REMOVED, &id, removed, BPF_ANY);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
