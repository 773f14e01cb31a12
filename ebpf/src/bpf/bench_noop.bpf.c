// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The floor for benchmarks: a raw_tp program on sys_enter that does nothing. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("raw_tp/sys_enter")
int podscope_bench_noop(void *ctx)
{
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
