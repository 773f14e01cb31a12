/* Loads an http.bpf.o, attaches its per-syscall tracepoint programs (named on the command line)
 * and drains its ring buffer, as the agent would (a full ring makes bpf_ringbuf_output fail early
 * and the programs' cost look lower than it is). Between SIGUSR1 and SIGTERM it counts the events
 * of the workload's connections (port `port` at one end) by what userspace reads in them, and the
 * programs' runs and run time (kernel.bpf_stats_enabled); at SIGTERM it prints both and exits.
 * Usage: loader OBJECT PORT PROGRAM... */
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/types.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "podscope.h"

static volatile sig_atomic_t begun, stop;
static void on_usr1(int sig) { begun = sig; }
static void on_term(int sig) { stop = sig; }

/* What an event tells userspace, except what differs from run to run (times, ids, ports). */
struct shape {
	__u8 kind, direction, protocol, role, family, flags;
	__u16 captured;
	__u32 total_len;
	__u64 data_hash;
	__u64 count;
};
static struct shape shapes[256];
static int nshapes;
static long others, foreign;
static int port;

static int on_event(void *ctx, void *data, size_t len)
{
	const struct http_event_head *h = data;
	(void)ctx;
	if (!begun)
		return 0;
	if (len < sizeof(*h) || len < sizeof(*h) + h->captured)
		return foreign++, 0;
	if (h->local_port != port && h->remote_port != port)
		return others++, 0;
	__u64 hash = 1469598103934665603ULL; /* FNV-1a over the captured bytes */
	const __u8 *bytes = (const __u8 *)data + sizeof(*h);
	for (int i = 0; i < h->captured; i++)
		hash = (hash ^ bytes[i]) * 1099511628211ULL;
	struct shape s;
	memset(&s, 0, sizeof(s)); /* padding included: shapes are compared whole */
	s.kind = h->kind, s.direction = h->direction, s.protocol = h->protocol, s.role = h->role;
	s.family = h->family, s.flags = h->flags, s.captured = h->captured, s.total_len = h->total_len;
	s.data_hash = hash;
	for (int i = 0; i < nshapes; i++) {
		s.count = shapes[i].count;
		if (!memcmp(&s, &shapes[i], sizeof(s))) {
			shapes[i].count++;
			return 0;
		}
	}
	if (nshapes < 256) {
		s.count = 1;
		shapes[nshapes++] = s;
	} else {
		foreign++;
	}
	return 0;
}

static void prog_stats(struct bpf_program *p, __u64 *runs, __u64 *ns)
{
	struct bpf_prog_info info = {};
	__u32 size = sizeof(info);
	*runs = *ns = 0;
	if (!bpf_obj_get_info_by_fd(bpf_program__fd(p), &info, &size)) {
		*runs = info.run_cnt;
		*ns = info.run_time_ns;
	}
}

static __u64 lost_events(struct bpf_object *obj)
{
	int cpus = libbpf_num_possible_cpus();
	__u64 values[cpus > 0 ? cpus : 1], sum = 0;
	__u32 key = HTTP_COUNTER_EVENTS_LOST;
	struct bpf_map *map = bpf_object__find_map_by_name(obj, "http_counters");
	if (!map || bpf_map_lookup_elem(bpf_map__fd(map), &key, values))
		return ~0ULL;
	for (int i = 0; i < cpus; i++)
		sum += values[i];
	return sum;
}

int main(int argc, char **argv)
{
	if (argc < 4)
		return 1;
	port = atoi(argv[2]);
	int nprogs = argc - 3;
	struct bpf_program *progs[64];
	__u64 runs0[64], ns0[64];
	struct bpf_object *obj = bpf_object__open_file(argv[1], NULL);
	if (!obj || bpf_object__load(obj)) {
		fprintf(stderr, "cannot load %s\n", argv[1]);
		return 1;
	}
	for (int i = 0; i < nprogs && i < 64; i++) {
		progs[i] = bpf_object__find_program_by_name(obj, argv[3 + i]);
		if (!progs[i] || !bpf_program__attach(progs[i])) {
			fprintf(stderr, "cannot attach %s\n", argv[3 + i]);
			return 2;
		}
	}
	struct ring_buffer *rb = ring_buffer__new(bpf_map__fd(bpf_object__find_map_by_name(obj, "http_events")), on_event, NULL, NULL);
	if (!rb)
		return 3;
	/* No SA_RESTART: a signal ends the ring buffer's epoll_wait at once. */
	struct sigaction usr1 = { .sa_handler = on_usr1 }, term = { .sa_handler = on_term };
	sigaction(SIGUSR1, &usr1, NULL);
	sigaction(SIGTERM, &term, NULL);
	printf("ready\n");
	fflush(stdout);
	while (!begun)
		ring_buffer__poll(rb, 50);
	ring_buffer__consume(rb); /* events from before the mark are not counted */
	__u64 lost0 = lost_events(obj);
	for (int i = 0; i < nprogs; i++)
		prog_stats(progs[i], &runs0[i], &ns0[i]);
	printf("begun\n");
	fflush(stdout);
	while (!stop)
		ring_buffer__poll(rb, 50);
	for (int i = 0; i < nprogs; i++) {
		__u64 runs, ns;
		prog_stats(progs[i], &runs, &ns);
		printf("prog %s %llu %llu\n", argv[3 + i], runs - runs0[i], ns - ns0[i]);
	}
	ring_buffer__consume(rb);
	printf("lost %llu\nothers %ld\nforeign %ld\n", lost_events(obj) - lost0, others, foreign);
	for (int i = 0; i < nshapes; i++)
		printf("shape %u %u %u %u %u %u %u %u %016llx %llu\n", shapes[i].kind, shapes[i].direction, shapes[i].protocol,
		       shapes[i].role, shapes[i].family, shapes[i].flags, shapes[i].captured, shapes[i].total_len,
		       (unsigned long long)shapes[i].data_hash, (unsigned long long)shapes[i].count);
	return 0;
}
