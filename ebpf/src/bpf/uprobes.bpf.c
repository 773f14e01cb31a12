// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * uprobes: a user function's entry (argument N) or return (return value), captured as a string
 * (read from user memory, up to `max_len` bytes) or as an integer, counted per cgroup, process
 * and value. One copy of this object is loaded per configured uprobe, with its own settings.
 *
 * At most max_series (process, value) series live in uprobe_hits; the hits of further series,
 * and of those a full map refused, are counted per cgroup in uprobe_other, so the series always
 * add up to the calls. The agent removes the series of processes that exited and gives their
 * room back.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "podscope.h"

#define CAPTURE_NONE 0
#define CAPTURE_STRING 1
#define CAPTURE_INT 2

const volatile __u32 capture_kind = CAPTURE_NONE;
const volatile __u32 capture_arg = 0; /* 1..6; the return value for uretprobes */
const volatile __u32 max_len = 80;
const volatile __u32 max_series = 1000;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1000); /* set to max_series by the agent unless configured */
	__type(key, struct uprobe_key);
	__type(value, __u64);
} uprobe_hits SEC(".maps");

/* cgroup → hits of the series beyond max_series, and of those uprobe_hits refused */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u64);
} uprobe_other SEC(".maps");

/* enum uprobe_series_slot */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} uprobe_series SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct uprobe_key);
} uprobe_scratch SEC(".maps");

/* Takes room for one more series under max_series. Several CPUs may take the last room at
 * once: each adds one, and whoever went past the cap gives it back. */
static __always_inline int admit_series(void)
{
	__u32 admitted_slot = UPROBE_SERIES_ADMITTED, released_slot = UPROBE_SERIES_RELEASED;
	__u64 *admitted = bpf_map_lookup_elem(&uprobe_series, &admitted_slot);
	__u64 *released = bpf_map_lookup_elem(&uprobe_series, &released_slot);
	if (!admitted || !released)
		return 0;
	if (__sync_fetch_and_add(admitted, 1) - *released < max_series)
		return 1;
	__sync_fetch_and_sub(admitted, 1);
	return 0;
}

static __always_inline void give_back_series(void)
{
	__u32 admitted_slot = UPROBE_SERIES_ADMITTED;
	__u64 *admitted = bpf_map_lookup_elem(&uprobe_series, &admitted_slot);
	if (admitted)
		__sync_fetch_and_sub(admitted, 1);
}

/* One hit of `key`: on its series while there is room under max_series, else on its cgroup's
 * `other` count. */
static __always_inline void count_hit(const struct uprobe_key *key)
{
	__u64 *count = bpf_map_lookup_elem(&uprobe_hits, key);
	if (count) {
		__sync_fetch_and_add(count, 1);
		return;
	}
	if (admit_series()) {
		__u64 one = 1;
		long err = podscope_insert(&uprobe_hits, UPROBES_MAP_HITS, key, &one, BPF_NOEXIST);
		if (err == 0)
			return;
		/* Another CPU made the series first (and took its own room), or the map is full
		 * (counted). */
		give_back_series();
		count = bpf_map_lookup_elem(&uprobe_hits, key);
		if (count) {
			__sync_fetch_and_add(count, 1);
			return;
		}
	}
	podscope_count(&uprobe_other, UPROBES_MAP_OTHER, &key->cgroup_id);
}

static __always_inline int record(__u64 raw)
{
	if (podscope_skip_current())
		return 0;
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	if (podscope_skip_cgroup(cgroup_id))
		return 0;
	__u32 zero = 0;
	struct uprobe_key *key = bpf_map_lookup_elem(&uprobe_scratch, &zero);
	if (!key)
		return 0;
	__builtin_memset(key, 0, sizeof(*key));
	key->cgroup_id = cgroup_id;
	key->pid = bpf_get_current_pid_tgid() >> 32;
	if (capture_kind == CAPTURE_STRING) {
		/* max_len characters and the terminating zero, at most the buffer: a bound the
		 * verifier can see. */
		__u32 n = max_len;
		if (n > PODSCOPE_UPROBE_VALUE_LEN - 1)
			n = PODSCOPE_UPROBE_VALUE_LEN - 1;
		n += 1;
		long got = bpf_probe_read_user_str(key->value, n, (const void *)raw);
		if (got <= 0)
			return 0;
		key->value_len = got - 1;
	} else if (capture_kind == CAPTURE_INT) {
		__builtin_memcpy(key->value, &raw, sizeof(raw));
		key->value_len = sizeof(raw);
	}
	count_hit(key);
	return 0;
}

/* Read through probe_read (the _CORE variants): with direct loads the compiler merges the
 * cases into one load at a computed context offset, which the verifier refuses. */
static __always_inline __u64 argument(struct pt_regs *ctx)
{
	switch (capture_arg) {
	case 1: return PT_REGS_PARM1_CORE(ctx);
	case 2: return PT_REGS_PARM2_CORE(ctx);
	case 3: return PT_REGS_PARM3_CORE(ctx);
	case 4: return PT_REGS_PARM4_CORE(ctx);
	case 5: return PT_REGS_PARM5_CORE(ctx);
	case 6:
#if defined(__TARGET_ARCH_x86)
		/* libbpf 1.1 has no PT_REGS_PARM6; the 6th argument is in r9. */
		return BPF_CORE_READ(ctx, r9);
#else
		return 0;
#endif
	default: return 0;
	}
}

SEC("uprobe")
int podscope_uprobe(struct pt_regs *ctx)
{
	return record(argument(ctx));
}

SEC("uretprobe")
int podscope_uretprobe(struct pt_regs *ctx)
{
	return record(PT_REGS_RC(ctx));
}

#include "mapped_files.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";
