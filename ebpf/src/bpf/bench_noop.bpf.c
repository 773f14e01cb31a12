// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Floors for benchmarks: programs on the syscall path that do nothing. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("raw_tp/sys_enter")
int podscope_bench_noop(void *ctx)
{
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* The same on tp_btf, to separate the cost of the hook from the cost of a program's work. */
SEC("tp_btf/sys_exit")
int podscope_bench_noop_btf(void *ctx)
{
	return 0;
}

/* A uprobe that does nothing: the floor for uprobe costs. */
SEC("uprobe")
int podscope_bench_noop_uprobe(void *ctx)
{
	return 0;
}

/* The scheduler's hooks, doing nothing: the floor of the sched probe's costs. */
SEC("tp_btf/sched_switch")
int podscope_bench_noop_switch(void *ctx)
{
	return 0;
}

SEC("tp_btf/sched_wakeup")
int podscope_bench_noop_wakeup(void *ctx)
{
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int podscope_bench_noop_wakeup_new(void *ctx)
{
	return 0;
}
