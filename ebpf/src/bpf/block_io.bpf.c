// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * block_io: per device and operation (read, write, flush, discard), the request latency from
 * issue to completion as a log2 histogram, and the bytes completed. Block requests complete in
 * interrupt context, where the "current" cgroup means nothing, so this probe is per device.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "podscope.h"

#define REQ_OP_BITS 8
#define REQ_OP_MASK ((1 << REQ_OP_BITS) - 1)
#define MINORBITS 20

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct block_key);
	__type(value, struct block_stats);
} block_stats SEC(".maps");

/* request address → issue time */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u64);
} block_start SEC(".maps");

static struct block_stats zero_stats;

SEC("tp_btf/block_rq_issue")
int BPF_PROG(podscope_block_issue, struct request *rq)
{
	__u64 id = (__u64)rq;
	__u64 now = bpf_ktime_get_ns();
	podscope_insert(&block_start, BLOCK_IO_MAP_START, &id, &now, BPF_ANY);
	return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(podscope_block_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	__u64 id = (__u64)rq;
	__u64 *start = bpf_map_lookup_elem(&block_start, &id);
	if (!start)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	__u64 latency = now > *start ? now - *start : 0;
	bpf_map_delete_elem(&block_start, &id);

	__u32 op = BPF_CORE_READ(rq, cmd_flags) & REQ_OP_MASK;
	struct gendisk *disk = BPF_CORE_READ(rq, q, disk);
	__u32 major = BPF_CORE_READ(disk, major);
	__u32 minor = BPF_CORE_READ(disk, first_minor);
	struct block_key key = {
		.dev = (major << MINORBITS) | minor,
		.op = op <= BLOCK_DISCARD ? op : BLOCK_OTHER,
	};
	struct block_stats *stats = podscope_lookup_or_init(&block_stats, BLOCK_IO_MAP_STATS, &key, &zero_stats);
	if (!stats)
		return 0;
	__sync_fetch_and_add(&stats->bytes, nr_bytes);
	podscope_hist_add(&stats->latency_ns, latency);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
