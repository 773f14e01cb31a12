// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * http: HTTP/1.x and HTTP/2 (gRPC) traffic of TCP connections, read where the application reads
 * and writes its sockets. Connections are known from accept/accept4 (server) and connect
 * (client) and forgotten at close; their first bytes decide the protocol (HTTP/1 request or
 * status line, the HTTP/2 preface, a TLS record, or something else, never looked at again).
 * For HTTP/1 every read or write that starts a message goes to userspace with the first bytes
 * of the message head (and the rest of a head split over several reads, up to capture_bytes);
 * for HTTP/2 every read and write does, as userspace follows the frames. Userspace parses and
 * pairs; the kernel gives the time of each message: reads at syscall exit, writes at entry.
 * HTTP/2 is recognised by the client's preface or the server's first SETTINGS frame.
 *
 * Two ways to hook the same handlers: the per-syscall tracepoints (syscalls:sys_enter_write,
 * sys_exit_read, ...), so other syscalls run none of this probe's programs, or, where tracefs
 * cannot be mounted, tp_btf on raw sys_enter/sys_exit filtered by syscall number. The loader
 * attaches one set.
 *
 * TLS: uprobes on OpenSSL's SSL_read/SSL_write (and the _ex forms) see the plaintext; the
 * socket is found through the syscalls the SSL call makes on the same thread (see below).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "podscope.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define EINPROGRESS 115

/* x86_64 syscall numbers and argument registers (podscope.h refuses other architectures). */
#define NR_READ 0
#define NR_WRITE 1
#define NR_CLOSE 3
#define NR_READV 19
#define NR_WRITEV 20
#define NR_CONNECT 42
#define NR_ACCEPT 43
#define NR_SENDTO 44
#define NR_RECVFROM 45
#define NR_SENDMSG 46
#define NR_RECVMSG 47
#define NR_ACCEPT4 288

/* iovecs copied from per readv/writev/recvmsg/sendmsg, and summed for a write's length (more
 * and the length is unknown: HTTP/2 userspace then gives the direction up). */
#define MAX_IOVECS 32
#define MAX_IOVECS_SUMMED 64

const volatile __u32 capture_bytes = 512;  /* of a request head (HTTP/1), of each call (HTTP/2) */
const volatile __u64 wakeup_bytes = 65536; /* waiting bytes that wake the agent early */

/* A connection of a process: key tgid << 32 | fd. */
struct http_conn {
	__u64 cgroup_id;
	__u64 ssl; /* the SSL object using this socket, once known */
	__u8 local_addr[16];
	__u8 remote_addr[16];
	__u16 local_port;
	__u16 remote_port;
	__u8 family;
	__u8 role;
	__u8 protocol;
	/* HTTP/1: head bytes still to capture in `budget_dir` (a head split over several reads). */
	__u8 budget_dir;
	__u32 budget;
	__u8 tls; /* bound to an SSL object: its syscalls carry ciphertext, the uprobes plaintext */
	/* HTTP/1: the direction whose next bytes are most likely a request head (requests go the
	 * other way from the last response; the first one by the role), 0 when a request head was
	 * the last thing that went that way (its body may follow). Decides only how much is read
	 * at once, never what is sent. */
	__u8 head_next;
	__u8 _pad[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct http_conn);
} http_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 19);
} http_events SEC(".maps");

/* The event being built (too large for the stack), and room for a copy that starts near its end. */
struct http_scratch {
	struct http_event event;
	__u8 overflow[PODSCOPE_HTTP_CAPTURE_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct http_scratch);
} http_scratch SEC(".maps");

/* enum http_counter, summed over CPUs by userspace. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, HTTP_COUNTER_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} http_counters SEC(".maps");

/* An OpenSSL call in progress on a thread (key: pid_tgid): what the uprobe at its entry saw. */
struct ssl_call {
	__u64 ssl;
	__u64 buf;
	__u64 readbytes; /* SSL_read_ex: where the byte count goes */
	__u32 num;
	__u8 direction;
	__u8 is_ex;
	__u8 consumed; /* SSL_write: the plaintext went out with the call's syscall */
	__u8 _pad;
	__u32 fd; /* the socket, once a syscall inside the call showed it (NO_FD until then) */
	__u32 _pad2;
};

#define NO_FD HTTP_NO_FD

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct ssl_call);
} http_ssl_calls SEC(".maps");

/* Entries of http_ssl_calls that the uprobes made and have not deleted yet: while there are none,
 * no socket syscall can be part of an SSL call and the lookup in http_ssl_calls is skipped (it
 * cost every read and write a second hash lookup). A thread that ends inside an SSL call leaves
 * its entry, and this count above zero: that only loses the saving. */
__u64 ssl_calls_in_flight = 0;

static __always_inline void ssl_call_done(__u64 *id)
{
	if (bpf_map_delete_elem(&http_ssl_calls, id) == 0)
		__sync_fetch_and_add(&ssl_calls_in_flight, -1);
}

/* (tgid, SSL object) → the socket it was seen on (NO_FD until then), and the protocol its first
 * plaintext showed. */
struct ssl_key {
	__u32 tgid;
	__u32 _pad;
	__u64 ssl;
};

struct ssl_state {
	__u32 fd;
	__u8 protocol;
	__u8 _pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 16384);
	__type(key, struct ssl_key);
	__type(value, struct ssl_state);
} http_ssl_fds SEC(".maps");

/* Per thread, for libraries that feed OpenSSL through memory buffers and do the socket I/O
 * themselves (gRPC's C core): the TLS socket it last read ciphertext from, and the SSL object
 * whose plaintext it last encrypted without a socket. The next such read or write ties them. */
struct tls_thread {
	__u32 read_fd;
	__u32 _pad;
	__u64 written_ssl;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, struct tls_thread);
} http_tls_threads SEC(".maps");

static __always_inline void count(__u32 counter)
{
	__u64 *value = bpf_map_lookup_elem(&http_counters, &counter);
	if (value)
		*value += 1;
}

static __always_inline __u64 conn_key(__u32 tgid, __u32 fd)
{
	return ((__u64)tgid << 32) | fd;
}

/* The TCP socket behind descriptor `fd` of the current process, or NULL. */
static __always_inline struct sock *tcp_sock_of(__u32 fd)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	if (!fdt || fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = 0;
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return 0;
	if ((BPF_CORE_READ(file, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return 0;
	struct socket *sock = BPF_CORE_READ(file, private_data);
	struct sock *sk = BPF_CORE_READ(sock, sk);
	if (!sk || BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	return sk;
}

/* Starts tracking descriptor `fd` as a connection of `role`. */
static __always_inline void track(__u32 fd, __u8 role)
{
	if (podscope_skip_current())
		return;
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	if (podscope_skip_cgroup(cgroup_id))
		return;
	struct sock *sk = tcp_sock_of(fd);
	if (!sk)
		return;
	struct http_conn conn = {
		.cgroup_id = cgroup_id,
		.role = role,
		.head_next = role == HTTP_ROLE_SERVER ? HTTP_DIR_IN : HTTP_DIR_OUT,
	};
	conn.family = BPF_CORE_READ(sk, __sk_common.skc_family);
	conn.local_port = BPF_CORE_READ(sk, __sk_common.skc_num);
	conn.remote_port = __builtin_bswap16(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (conn.family == AF_INET) {
		__u32 local = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__u32 remote = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		__builtin_memcpy(conn.local_addr, &local, 4);
		__builtin_memcpy(conn.remote_addr, &remote, 4);
	} else {
		BPF_CORE_READ_INTO(&conn.local_addr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&conn.remote_addr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	}
	__u64 key = conn_key(bpf_get_current_pid_tgid() >> 32, fd);
	podscope_insert(&http_conns, HTTP_MAP_CONNS, &key, &conn, BPF_ANY);
}

/* Where a call's bytes are: one buffer, or an array of iovecs. */
struct source {
	const void *ptr;
	__u64 iovcnt; /* 0: `ptr` is the buffer itself */
	__u64 ssl;    /* the SSL object whose plaintext this is, or 0 */
	__u32 len;    /* bytes read, or asked to be written */
	/* `ptr` is a sendmsg/recvmsg message header, not read yet: read for tracked connections only. */
	__u8 msghdr;
	/* A write through iovecs: `len` is not known before the first copy, which sums the iovecs
	 * as it reads them (each iovec is read once, and only for tracked connections). */
	__u8 sum_len;
};

/* The scratch an event being built is in (the event is its first member). */
static __always_inline struct http_scratch *scratch_of(struct http_event *e)
{
	return (struct http_scratch *)e;
}

/* iovecs read in one bpf_probe_read_user at the start of a copy (writev from a server is
 * typically a head and a body: two). */
#define IOV_BATCH 4

/* What copy_iovecs found besides the bytes: the iovecs' summed length, and (its own scratch)
 * the first iovec its copy did not read. */
struct iov_sum {
	__u64 len;
	__u32 next;
	__u32 _pad;
};

/* Copies up to `want` (at most PODSCOPE_HTTP_CAPTURE_MAX) of the bytes of the `iovcnt` iovecs at
 * user address `iov_addr` into `scratch`'s event data; returns how many. With `sum`, also sets
 * `sum->len` to the sum of the iovecs' lengths (of the first MAX_IOVECS_SUMMED; more and it is
 * unknown: 0xffffffff) from the same reads. Each iovec is read once, the first IOV_BATCH together
 * (one by one if that read fails, so an unreadable one ends the copy and the sum where it is,
 * as before). A global function: the verifier checks it once, not once per place it is called
 * with every state of the caller (inlined, writev's program went past the verifier's million
 * instructions); its arguments are values, not the caller's `struct source`, so that the
 * compiler still sees which callers never get here (write, read: no iovecs). Its pointer
 * arguments need Linux 5.12; the probe needs 5.15 anyway (bpf_task_pt_regs). */
__attribute__((noinline)) int copy_iovecs(__u64 iov_addr, __u64 iovcnt, __u32 want, struct iov_sum *sum,
					  struct http_scratch *scratch)
{
	if (!scratch)
		return 0;
	if (want > PODSCOPE_HTTP_CAPTURE_MAX)
		want = PODSCOPE_HTTP_CAPTURE_MAX;
	__u8 *dst = scratch->event.data;
	const struct iovec *iov = (const struct iovec *)iov_addr;
	struct iovec batch[IOV_BATCH] = {};
	__u32 batched = iovcnt < IOV_BATCH ? iovcnt : IOV_BATCH;
	if (batched == 0 || bpf_probe_read_user(batch, batched * sizeof(struct iovec), iov))
		batched = 0;
	/* Two loops, the copy and then the rest of the sum: one loop doing both took the verifier
	 * past its million instructions. */
	__u32 done = 0;
	__u64 total = 0;
	int next = 0, unreadable = 0;
	for (int i = 0; i < MAX_IOVECS; i++) {
		if (i >= iovcnt || done >= want)
			break;
		struct iovec vec;
		if (i < batched) {
			vec = batch[i & (IOV_BATCH - 1)];
		} else if (bpf_probe_read_user(&vec, sizeof(vec), &iov[i])) {
			unreadable = 1;
			break;
		}
		total += vec.iov_len;
		next = i + 1;
		__u32 n = vec.iov_len < want - done ? vec.iov_len : want - done;
		if (n > PODSCOPE_HTTP_CAPTURE_MAX)
			n = PODSCOPE_HTTP_CAPTURE_MAX;
		/* done < PODSCOPE_HTTP_CAPTURE_MAX and n <= it: the copy stays within event + overflow. */
		if (n == 0 || bpf_probe_read_user(dst + (done & (PODSCOPE_HTTP_CAPTURE_MAX - 1)), n, vec.iov_base))
			break;
		done += n;
	}
	if (!sum)
		return done;
	if (!unreadable) {
		/* Through memory the verifier does not follow: the sum's loop is then checked once, not
		 * once for every way the copy's loop ended. */
		sum->next = next;
		for (int k = 0; k < MAX_IOVECS_SUMMED; k++) {
			int i = sum->next + k;
			if (i >= iovcnt || i >= MAX_IOVECS_SUMMED)
				break;
			struct iovec vec;
			if (i < batched)
				vec = batch[i & (IOV_BATCH - 1)];
			else if (bpf_probe_read_user(&vec, sizeof(vec), &iov[i]))
				break;
			total += vec.iov_len;
		}
	}
	if (iovcnt > MAX_IOVECS_SUMMED)
		total = 0xffffffff;
	sum->len = total > 0xffffffff ? 0xffffffff : total;
	return done;
}

/* Copies up to `max` (at most PODSCOPE_HTTP_CAPTURE_MAX) of the call's first bytes into the event
 * data of `scratch`; returns how many. With `sum_len`, also sets `len` to the iovecs' summed
 * length (copy_iovecs). */
static __always_inline __u32 copy_source(struct source *src, struct http_scratch *scratch, __u32 max)
{
	__u32 want = !src->sum_len && src->len < max ? src->len : max;
	if (want > PODSCOPE_HTTP_CAPTURE_MAX)
		want = PODSCOPE_HTTP_CAPTURE_MAX;
	if (src->iovcnt == 0) {
		if (want == 0 || bpf_probe_read_user(scratch->event.data, want, src->ptr))
			return 0;
		return want;
	}
	if (!src->sum_len)
		return copy_iovecs((__u64)src->ptr, src->iovcnt, want, 0, scratch);
	struct iov_sum sum = {};
	__u32 done = copy_iovecs((__u64)src->ptr, src->iovcnt, want, &sum, scratch);
	src->len = sum.len;
	src->sum_len = 0;
	return done;
}

static __always_inline int starts_with(const __u8 *b, const char *token, int n)
{
	for (int i = 0; i < n; i++)
		if (b[i] != token[i])
			return 0;
	return 1;
}

/* The HTTP/1 request methods of RFC 9110 and PATCH. */
static __always_inline int is_request_start(const __u8 *b)
{
	switch (b[0]) {
	case 'G': return starts_with(b, "GET ", 4);
	case 'P': return starts_with(b, "POST ", 5) || starts_with(b, "PUT ", 4) || starts_with(b, "PATCH ", 6);
	case 'H': return starts_with(b, "HEAD ", 5);
	case 'D': return starts_with(b, "DELETE ", 7);
	case 'O': return starts_with(b, "OPTIONS ", 8);
	case 'C': return starts_with(b, "CONNECT ", 8);
	case 'T': return starts_with(b, "TRACE ", 6);
	default: return 0;
	}
}

static __always_inline int is_response_start(const __u8 *b)
{
	return starts_with(b, "HTTP/1.", 7) && (b[7] == '0' || b[7] == '1') && b[8] == ' ';
}

static __always_inline int is_http2_preface(const __u8 *b)
{
	return starts_with(b, "PRI * HTTP/2.0\r\n", 16);
}

/* A server's first HTTP/2 frame: SETTINGS (not an ACK) on stream 0, a whole number of settings.
 * A gRPC server writes it as soon as it accepts, before it reads the client's preface, so it can
 * be the first bytes of either end. */
static __always_inline int is_http2_settings(const __u8 *b)
{
	return b[0] == 0 && b[2] % 6 == 0 && b[3] == 0x04 && b[4] == 0 && b[5] == 0 && b[6] == 0 && b[7] == 0 && b[8] == 0;
}

/* A TLS handshake or application-data record header. */
static __always_inline int is_tls_record(const __u8 *b)
{
	return (b[0] == 0x16 || b[0] == 0x17) && b[1] == 0x03 && b[2] <= 0x04;
}

/* Bytes needed to tell a protocol from a connection's first bytes. */
#define DETECT_BYTES 16

/* Sends the event in `scratch` with `captured` bytes of data. */
static __always_inline void submit(struct http_event *e, __u32 captured)
{
	if (captured > PODSCOPE_HTTP_CAPTURE_MAX)
		captured = PODSCOPE_HTTP_CAPTURE_MAX;
	e->head.captured = captured;
	/* Wake the agent each time the waiting bytes cross a multiple of wakeup_bytes: once per
	 * batch, and again while it is behind, never per event. A wake-up is a self-interrupt (a
	 * VM exit on virtual machines): one per event once the agent fell behind cost more than
	 * everything else here (measured: 2 µs per call with nginx under wrk). */
	__u64 size = offsetof(struct http_event, data) + captured;
	__u64 waiting = bpf_ringbuf_query(&http_events, BPF_RB_AVAIL_DATA);
	__u64 every = wakeup_bytes ? wakeup_bytes : 1;
	__u64 flags = (waiting + size) / every != waiting / every ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
	if (bpf_ringbuf_output(&http_events, e, size, flags))
		count(HTTP_COUNTER_EVENTS_LOST);
}

static __always_inline struct http_event *start_event(const struct http_conn *conn, __u32 fd, __u8 kind, __u8 direction)
{
	__u32 zero = 0;
	struct http_scratch *scratch = bpf_map_lookup_elem(&http_scratch, &zero);
	if (!scratch)
		return 0;
	struct http_event *e = &scratch->event;
	__u64 id = bpf_get_current_pid_tgid();
	e->head.timestamp_ns = bpf_ktime_get_ns();
	e->head.cgroup_id = conn->cgroup_id;
	e->head.tgid = id >> 32;
	e->head.tid = (__u32)id;
	e->head.fd = fd;
	e->head.ssl = 0;
	e->head.total_len = 0;
	e->head.captured = 0;
	e->head.kind = kind;
	e->head.direction = direction;
	e->head.protocol = conn->protocol;
	e->head.role = conn->role;
	e->head.family = conn->family;
	e->head.flags = 0;
	e->head.local_port = conn->local_port;
	e->head.remote_port = conn->remote_port;
	__builtin_memcpy(e->head.local_addr, conn->local_addr, 16);
	__builtin_memcpy(e->head.remote_addr, conn->remote_addr, 16);
	return e;
}

/* The ending of a captured head: whether its last four bytes are the blank line. */
static __always_inline int ends_head(const __u8 *data, __u32 captured)
{
	if (captured < 4)
		return 0;
	__u32 at = (captured - 4) & (PODSCOPE_HTTP_CAPTURE_MAX - 1);
	return data[at] == '\r' && data[at + 1] == '\n' && data[at + 2] == '\r' && data[at + 3] == '\n';
}

/* The iovecs of a sendmsg/recvmsg message header (`src->ptr`); nonzero if unreadable. */
static __always_inline int from_msghdr(struct source *src)
{
	struct user_msghdr msg;
	if (bpf_probe_read_user(&msg, sizeof(msg), src->ptr))
		return -1;
	src->ptr = msg.msg_iov;
	src->iovcnt = msg.msg_iovlen;
	src->msghdr = 0;
	return 0;
}

/* Application bytes a process read from or wrote to connection `fd`: what its syscall carried,
 * or the plaintext of an SSL call on it (`tls`). */
static __always_inline void on_stream(struct http_conn *conn, __u32 fd, __u8 direction, struct source *src, int tls)
{
	if ((src->len == 0 && !src->sum_len) || conn->protocol == HTTP_PROTO_OTHER || conn->protocol == HTTP_PROTO_TLS)
		return;
	if (src->msghdr && from_msghdr(src))
		return;
	struct http_event *e = start_event(conn, fd, HTTP_EVENT_DATA, direction);
	if (!e)
		return;
	if (tls) {
		e->head.flags |= HTTP_FLAG_TLS;
		e->head.ssl = src->ssl;
	}
	/* One read where the call most likely carries what is sent: a request head (HTTP/1, in the
	 * direction requests go), every HTTP/2 call; else the bytes detection needs, and a second
	 * read only when they say the call starts a request. What is sent does not depend on it. */
	__u32 first = DETECT_BYTES;
	if (conn->protocol == HTTP_PROTO_HTTP2 || direction == conn->head_next)
		first = capture_bytes;
	__u32 got = copy_source(src, scratch_of(e), first);
	if (src->len == 0)
		return; /* a write of empty iovecs */
	e->head.total_len = src->len;
	if (got < DETECT_BYTES) {
		/* Short calls decide nothing; fill the rest so stale bytes match no token. */
		for (int i = 0; i < DETECT_BYTES; i++)
			if (i >= got)
				e->data[i] = 0;
	}
	if (conn->protocol == HTTP_PROTO_UNKNOWN) {
		if (is_request_start(e->data) || is_response_start(e->data)) {
			conn->protocol = HTTP_PROTO_HTTP1;
		} else if (is_http2_preface(e->data)) {
			conn->protocol = HTTP_PROTO_HTTP2;
		} else if (got >= 9 && is_http2_settings(e->data)) {
			conn->protocol = HTTP_PROTO_HTTP2;
		} else if (got >= 3 && is_tls_record(e->data)) {
			conn->protocol = HTTP_PROTO_TLS;
			return;
		} else if (got >= DETECT_BYTES) {
			conn->protocol = HTTP_PROTO_OTHER;
			count(HTTP_COUNTER_NOT_HTTP);
			return;
		} else {
			return;
		}
		e->head.protocol = conn->protocol;
	}
	/* What this call sends: the bytes it needs (one copy site for all cases: the verifier
	 * explores each inlined copy loop again). */
	enum { BODY, HTTP2, REQUEST, RESPONSE, CONTINUATION } what = BODY;
	__u32 need = 0;
	if (conn->protocol == HTTP_PROTO_HTTP2) {
		what = HTTP2;
		need = capture_bytes;
	} else if (is_request_start(e->data)) {
		what = REQUEST;
		need = capture_bytes;
	} else if (is_response_start(e->data)) {
		/* The status line's first DETECT_BYTES ("HTTP/1.1 200 OK\r"): what userspace reads. */
		what = RESPONSE;
		need = DETECT_BYTES;
	} else if (conn->budget > 0 && conn->budget_dir == direction) {
		/* The rest of a head begun by the last event. */
		what = CONTINUATION;
		need = conn->budget;
	} else {
		/* A body, or data after the message head: nothing to read. */
		conn->budget = 0;
		return;
	}
	__u32 captured = first >= need ? (got < need ? got : need) : copy_source(src, scratch_of(e), need);
	if (what == REQUEST) {
		conn->budget_dir = direction;
		conn->budget = ends_head(e->data, captured) ? 0 : capture_bytes - captured;
		conn->head_next = 0;
	} else if (what == RESPONSE) {
		conn->budget = 0;
		conn->head_next = direction == HTTP_DIR_IN ? HTTP_DIR_OUT : HTTP_DIR_IN;
	} else if (what == CONTINUATION) {
		e->head.flags |= HTTP_FLAG_CONTINUATION;
		conn->budget = ends_head(e->data, captured) || captured >= need ? 0 : need - captured;
	}
	submit(e, captured);
}

/* Ties SSL object `ssl` to connection `fd`: its syscalls carry ciphertext, so they are not read
 * as application bytes; its plaintext is, with the protocol its first plaintext showed (if any
 * went out before the socket was known: userspace is told to take it). */
static __always_inline void bind_ssl(struct http_conn *conn, __u32 fd, __u64 ssl)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct ssl_key key = { .tgid = tgid, .ssl = ssl };
	struct ssl_state *known = bpf_map_lookup_elem(&http_ssl_fds, &key);
	conn->tls = 1;
	conn->ssl = ssl;
	/* What was seen of the handshake decided nothing: the plaintext decides. */
	conn->protocol = known ? known->protocol : HTTP_PROTO_UNKNOWN;
	struct ssl_state state = { .fd = fd, .protocol = conn->protocol };
	podscope_insert(&http_ssl_fds, HTTP_MAP_SSL_FDS, &key, &state, BPF_ANY);
	if (known) {
		struct http_event *e = start_event(conn, fd, HTTP_EVENT_BIND, 0);
		if (e) {
			e->head.ssl = ssl;
			submit(e, 0);
		}
	}
}

/* Binds the SSL call in progress on this thread, if any, to connection `fd`, and sends the
 * plaintext of an SSL_write it belongs to. Returns whether the syscall belongs to an SSL call. */
static __always_inline int ssl_call_syscall(struct http_conn *conn, __u32 fd, __u8 direction)
{
	if (*(volatile __u64 *)&ssl_calls_in_flight == 0)
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	struct ssl_call *call = bpf_map_lookup_elem(&http_ssl_calls, &id);
	if (!call)
		return 0;
	if (!conn->tls)
		bind_ssl(conn, fd, call->ssl);
	call->fd = fd;
	if (call->direction == HTTP_DIR_OUT && direction == HTTP_DIR_OUT && !call->consumed) {
		call->consumed = 1;
		struct source plain = { .ptr = (const void *)call->buf, .len = call->num, .ssl = call->ssl };
		on_stream(conn, fd, HTTP_DIR_OUT, &plain, 1);
	}
	return 1;
}

/* Ciphertext a thread reads or writes outside any SSL call, on a TLS connection not tied to its
 * SSL object yet: what a library that does its own socket I/O does. A write right after that
 * thread encrypted plaintext for an unknown socket ties the two; a read is remembered for the
 * SSL_read that will decrypt it. */
static __always_inline void tls_io_outside_ssl(struct http_conn *conn, __u32 fd, __u8 direction)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct tls_thread *thread = bpf_map_lookup_elem(&http_tls_threads, &id);
	if (direction == HTTP_DIR_IN) {
		struct tls_thread fresh = { .read_fd = fd };
		if (thread)
			thread->read_fd = fd;
		else
			bpf_map_update_elem(&http_tls_threads, &id, &fresh, BPF_ANY);
		return;
	}
	if (thread && thread->written_ssl) {
		__u64 ssl = thread->written_ssl;
		thread->written_ssl = 0;
		bind_ssl(conn, fd, ssl);
	}
}

/* Bytes a process read from or wrote to descriptor `fd` with a syscall. */
static __always_inline void on_data(__u32 fd, __u8 direction, struct source *src)
{
	__u64 key = conn_key(bpf_get_current_pid_tgid() >> 32, fd);
	struct http_conn *conn = bpf_map_lookup_elem(&http_conns, &key);
	if (!conn)
		return;
	if (ssl_call_syscall(conn, fd, direction) || conn->tls)
		return;
	if (conn->protocol == HTTP_PROTO_TLS) {
		tls_io_outside_ssl(conn, fd, direction);
		return;
	}
	on_stream(conn, fd, direction, src, 0);
}

static __always_inline void on_close(__u32 fd)
{
	__u64 key = conn_key(bpf_get_current_pid_tgid() >> 32, fd);
	struct http_conn *conn = bpf_map_lookup_elem(&http_conns, &key);
	if (!conn)
		return;
	if (conn->protocol == HTTP_PROTO_HTTP1 || conn->protocol == HTTP_PROTO_HTTP2) {
		struct http_event *e = start_event(conn, fd, HTTP_EVENT_CLOSE, 0);
		if (e)
			submit(e, 0);
	}
	if (conn->ssl) {
		struct ssl_key ssl = { .tgid = key >> 32, .ssl = conn->ssl };
		bpf_map_delete_elem(&http_ssl_fds, &ssl);
	}
	bpf_map_delete_elem(&http_conns, &key);
}

/* ---- the handlers, by syscall ---- */

static __always_inline void on_enter(__u64 nr, __u64 fd, __u64 arg2, __u64 arg3)
{
	struct source src = { .ptr = (const void *)arg2 };
	switch (nr) {
	case NR_WRITE:
	case NR_SENDTO:
		src.len = arg3;
		break;
	case NR_WRITEV:
		src.iovcnt = arg3;
		src.sum_len = 1;
		break;
	case NR_SENDMSG:
		src.msghdr = 1;
		src.sum_len = 1;
		break;
	case NR_CLOSE:
		on_close(fd);
		return;
	default:
		return;
	}
	on_data(fd, HTTP_DIR_OUT, &src);
}

static __always_inline void on_exit(__u64 nr, __u64 fd, __u64 arg2, __u64 arg3, long ret)
{
	switch (nr) {
	case NR_ACCEPT:
	case NR_ACCEPT4:
		if (ret >= 0)
			track(ret, HTTP_ROLE_SERVER);
		return;
	case NR_CONNECT:
		if (ret == 0 || ret == -EINPROGRESS)
			track(fd, HTTP_ROLE_CLIENT);
		return;
	default:
		break;
	}
	if (ret <= 0)
		return;
	struct source src = { .ptr = (const void *)arg2, .len = ret };
	switch (nr) {
	case NR_READ:
	case NR_RECVFROM:
		break;
	case NR_READV:
		src.iovcnt = arg3;
		break;
	case NR_RECVMSG:
		src.msghdr = 1;
		break;
	default:
		return;
	}
	on_data(fd, HTTP_DIR_IN, &src);
}

/* ---- per-syscall tracepoints (tracefs) ---- */

/* At syscall exit only the return value is in the tracepoint's record; the arguments are still
 * in the registers saved at entry. bpf_task_pt_regs gives a BTF pointer: loads through it are
 * plain loads (the verifier guards them), three bpf_probe_read_kernel calls fewer per call. */
static __always_inline void exit_with_regs(__u64 nr, long ret)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	if (!regs)
		return;
	on_exit(nr, regs->di, regs->si, regs->dx, ret);
}

/* Whether an exit is worth the register reads: a connection made, or bytes read. */
static __always_inline int exit_matters(__u64 nr, long ret)
{
	if (nr == NR_CONNECT)
		return ret == 0 || ret == -EINPROGRESS;
	if (nr == NR_ACCEPT || nr == NR_ACCEPT4)
		return ret >= 0;
	return ret > 0;
}

#define EXIT_TRACEPOINT(name, nr)                                                       \
	SEC("tracepoint/syscalls/sys_exit_" #name)                                      \
	int podscope_http_exit_##name(struct trace_event_raw_sys_exit *ctx)            \
	{                                                                               \
		if (exit_matters(nr, ctx->ret))                                         \
			exit_with_regs(nr, ctx->ret);                                   \
		return 0;                                                               \
	}

#define ENTER_TRACEPOINT(name, nr)                                                      \
	SEC("tracepoint/syscalls/sys_enter_" #name)                                     \
	int podscope_http_enter_##name(struct trace_event_raw_sys_enter *ctx)          \
	{                                                                               \
		on_enter(nr, ctx->args[0], ctx->args[1], ctx->args[2]);                 \
		return 0;                                                               \
	}

EXIT_TRACEPOINT(read, NR_READ)
EXIT_TRACEPOINT(readv, NR_READV)
EXIT_TRACEPOINT(recvfrom, NR_RECVFROM)
EXIT_TRACEPOINT(recvmsg, NR_RECVMSG)
EXIT_TRACEPOINT(accept, NR_ACCEPT)
EXIT_TRACEPOINT(accept4, NR_ACCEPT4)
EXIT_TRACEPOINT(connect, NR_CONNECT)
ENTER_TRACEPOINT(write, NR_WRITE)
ENTER_TRACEPOINT(writev, NR_WRITEV)
ENTER_TRACEPOINT(sendto, NR_SENDTO)
ENTER_TRACEPOINT(sendmsg, NR_SENDMSG)
ENTER_TRACEPOINT(close, NR_CLOSE)

/* ---- raw syscall hooks (no tracefs): every syscall runs these, filtered by number ---- */

SEC("tp_btf/sys_enter")
int BPF_PROG(podscope_http_sys_enter, struct pt_regs *regs, long id)
{
	switch (id) {
	case NR_WRITE:
	case NR_WRITEV:
	case NR_SENDTO:
	case NR_SENDMSG:
	case NR_CLOSE:
		on_enter(id, regs->di, regs->si, regs->dx);
		return 0;
	default:
		return 0;
	}
}

SEC("tp_btf/sys_exit")
int BPF_PROG(podscope_http_sys_exit, struct pt_regs *regs, long ret)
{
	__u64 nr = PODSCOPE_SYSCALL_NR(regs);
	switch (nr) {
	case NR_READ:
	case NR_READV:
	case NR_RECVFROM:
	case NR_RECVMSG:
	case NR_ACCEPT:
	case NR_ACCEPT4:
	case NR_CONNECT:
		on_exit(nr, regs->di, regs->si, regs->dx, ret);
		return 0;
	default:
		return 0;
	}
}

/* ---- OpenSSL: SSL_read/SSL_write (and _ex) in libssl ---- */

/* The connection an SSL object was seen on, or NULL. */
static __always_inline struct http_conn *conn_of_ssl(__u64 ssl, __u32 *fd)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct ssl_key key = { .tgid = tgid, .ssl = ssl };
	struct ssl_state *bound = bpf_map_lookup_elem(&http_ssl_fds, &key);
	if (!bound || bound->fd == NO_FD)
		return 0;
	*fd = bound->fd;
	__u64 ckey = conn_key(tgid, *fd);
	return bpf_map_lookup_elem(&http_conns, &ckey);
}

static __always_inline int ssl_enter(__u64 ssl, __u64 buf, __u32 num, __u64 readbytes, __u8 direction, __u8 is_ex)
{
	if (podscope_skip_current())
		return 0;
	if (direction == HTTP_DIR_OUT) {
		/* Known socket: the plaintext goes now; else with the call's first syscall. */
		__u32 fd;
		struct http_conn *conn = conn_of_ssl(ssl, &fd);
		if (conn) {
			struct source plain = { .ptr = (const void *)buf, .len = num, .ssl = ssl };
			on_stream(conn, fd, HTTP_DIR_OUT, &plain, 1);
			return 0;
		}
	}
	struct ssl_call call = {
		.ssl = ssl, .buf = buf, .readbytes = readbytes, .num = num,
		.direction = direction, .is_ex = is_ex, .fd = NO_FD,
	};
	__u64 id = bpf_get_current_pid_tgid();
	long err = podscope_insert(&http_ssl_calls, HTTP_MAP_SSL_CALLS, &id, &call, BPF_NOEXIST);
	if (err == 0)
		__sync_fetch_and_add(&ssl_calls_in_flight, 1);
	else if (err == -PODSCOPE_EEXIST)
		/* This thread's earlier call left its entry (it ended in the call): take it over. */
		bpf_map_update_elem(&http_ssl_calls, &id, &call, BPF_EXIST);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(podscope_http_ssl_write, void *ssl, const void *buf, int num)
{
	return ssl_enter((__u64)ssl, (__u64)buf, num > 0 ? num : 0, 0, HTTP_DIR_OUT, 0);
}

/* Plaintext of an SSL object whose socket is not known yet (it encrypts into memory): sent with
 * the object instead of a socket, for userspace to keep until the object is tied to one. The
 * first such plaintext decides the protocol. */
static __always_inline void unbound_plaintext(__u64 ssl, __u64 buf, __u32 len, __u8 direction)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct ssl_key key = { .tgid = id >> 32, .ssl = ssl };
	struct ssl_state *state = bpf_map_lookup_elem(&http_ssl_fds, &key);
	struct http_conn none = { .cgroup_id = bpf_get_current_cgroup_id() };
	if (state) {
		none.protocol = state->protocol;
	} else {
		__u8 first[DETECT_BYTES] = {};
		if (len < DETECT_BYTES || bpf_probe_read_user(first, sizeof(first), (const void *)buf))
			return;
		if (is_http2_preface(first) || is_http2_settings(first))
			none.protocol = HTTP_PROTO_HTTP2;
		else if (is_request_start(first) || is_response_start(first))
			none.protocol = HTTP_PROTO_HTTP1;
		else
			none.protocol = HTTP_PROTO_OTHER;
		struct ssl_state fresh = { .fd = NO_FD, .protocol = none.protocol };
		podscope_insert(&http_ssl_fds, HTTP_MAP_SSL_FDS, &key, &fresh, BPF_ANY);
	}
	if (none.protocol == HTTP_PROTO_OTHER)
		return;
	struct http_event *e = start_event(&none, NO_FD, HTTP_EVENT_DATA, direction);
	if (!e)
		return;
	e->head.flags |= HTTP_FLAG_TLS;
	e->head.ssl = ssl;
	e->head.total_len = len;
	struct source plain = { .ptr = (const void *)buf, .len = len };
	submit(e, copy_source(&plain, scratch_of(e), capture_bytes));
}

/* SSL_write and SSL_write_ex return: the call is over. Plaintext that no syscall of the call
 * took, for a socket not known yet, goes out now; this thread's next TLS write ties them. */
SEC("uretprobe")
int BPF_KRETPROBE(podscope_http_ssl_write_return)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct ssl_call *call = bpf_map_lookup_elem(&http_ssl_calls, &id);
	if (!call)
		return 0;
	__u64 ssl = call->ssl, buf = call->buf;
	__u32 num = call->num, consumed = call->consumed;
	ssl_call_done(&id);
	__u32 fd;
	if (consumed || conn_of_ssl(ssl, &fd))
		return 0;
	unbound_plaintext(ssl, buf, num, HTTP_DIR_OUT);
	struct tls_thread fresh = { .read_fd = NO_FD, .written_ssl = ssl };
	struct tls_thread *thread = bpf_map_lookup_elem(&http_tls_threads, &id);
	if (thread)
		thread->written_ssl = ssl;
	else
		bpf_map_update_elem(&http_tls_threads, &id, &fresh, BPF_ANY);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(podscope_http_ssl_read, void *ssl, void *buf, int num)
{
	return ssl_enter((__u64)ssl, (__u64)buf, num > 0 ? num : 0, 0, HTTP_DIR_IN, 0);
}

SEC("uprobe")
int BPF_KPROBE(podscope_http_ssl_read_ex, void *ssl, void *buf, __u64 num, __u64 *readbytes)
{
	return ssl_enter((__u64)ssl, (__u64)buf, num > 0xffffffff ? 0xffffffff : num, (__u64)readbytes, HTTP_DIR_IN, 1);
}

/* SSL_read and SSL_read_ex return: the plaintext is in the buffer now. */
SEC("uretprobe")
int BPF_KRETPROBE(podscope_http_ssl_read_return, long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct ssl_call *call = bpf_map_lookup_elem(&http_ssl_calls, &id);
	if (!call)
		return 0;
	/* Both return an int: the upper half of the register is not part of it. */
	int rc = (int)ret;
	__u64 got = 0;
	if (call->is_ex) {
		if (rc == 1 && call->readbytes)
			bpf_probe_read_user(&got, sizeof(got), (const void *)call->readbytes);
	} else if (rc > 0) {
		got = rc;
	}
	__u32 fd = call->fd;
	__u64 buf = call->buf;
	__u64 ssl = call->ssl;
	ssl_call_done(&id);
	if (got == 0)
		return 0;
	struct http_conn *conn;
	if (fd != NO_FD) {
		__u64 key = conn_key(id >> 32, fd);
		conn = bpf_map_lookup_elem(&http_conns, &key);
	} else {
		/* Decrypted from what an earlier call read off the socket. */
		conn = conn_of_ssl(ssl, &fd);
	}
	if (!conn) {
		/* Decrypted from memory its library filled: the TLS socket this thread last read. */
		struct tls_thread *thread = bpf_map_lookup_elem(&http_tls_threads, &id);
		if (!thread || thread->read_fd == NO_FD)
			return 0;
		fd = thread->read_fd;
		__u64 key = conn_key(id >> 32, fd);
		conn = bpf_map_lookup_elem(&http_conns, &key);
		if (!conn || conn->tls || conn->protocol != HTTP_PROTO_TLS)
			return 0;
		bind_ssl(conn, fd, ssl);
	}
	struct source plain = { .ptr = (const void *)buf, .len = got > 0xffffffff ? 0xffffffff : got, .ssl = ssl };
	on_stream(conn, fd, HTTP_DIR_IN, &plain, 1);
	return 0;
}

/* Which file the kernel sees behind a libssl inside a container (tls.libraries container:). */
#include "mapped_files.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";
