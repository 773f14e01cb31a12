// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Not a probe and never attached: a program the tests run (BPF_PROG_TEST_RUN) to check
 * podscope_hist_add, the log2 bucketing of every probe's distributions, with values no workload
 * in a test can produce (durations of days or centuries). Each run adds its first argument to
 * the one histogram of `hist_check`.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "podscope.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct podscope_hist);
} hist_check SEC(".maps");

SEC("raw_tp")
int podscope_hist_check(struct bpf_raw_tracepoint_args *ctx)
{
	__u32 zero = 0;
	struct podscope_hist *h = bpf_map_lookup_elem(&hist_check, &zero);
	if (h)
		podscope_hist_add(h, ctx->args[0]);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
