/* HTTP/1.1 keep-alive client in lockstep: one connection to 127.0.0.1:PORT, N requests, each
 * written with one write() and its response read whole (head and Content-Length body) before
 * the next. Prints the CPU seconds it used and the requests answered. Usage: client PORT N */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 3)
		return 1;
	long n = atol(argv[2]), answered = 0;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])), .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (connect(fd, (void *)&a, sizeof(a)))
		return perror("connect"), 1;
	static const char request[] = "GET /items/1 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: cost\r\n\r\n";
	char buf[4096];
	for (long i = 0; i < n; i++) {
		if (write(fd, request, sizeof(request) - 1) != sizeof(request) - 1)
			return perror("write"), 1;
		size_t have = 0;
		for (;;) {
			ssize_t got = read(fd, buf + have, sizeof(buf) - 1 - have);
			if (got <= 0)
				return fprintf(stderr, "read: connection ended after %ld requests\n", answered), 1;
			have += got;
			buf[have] = 0;
			char *end = strstr(buf, "\r\n\r\n");
			char *length = strstr(buf, "Content-Length: ");
			if (end && length && have >= (size_t)(end + 4 - buf) + atol(length + 16))
				break;
		}
		answered++;
	}
	close(fd);
	struct rusage r;
	getrusage(RUSAGE_SELF, &r);
	printf("%.6f %ld\n", r.ru_utime.tv_sec + r.ru_stime.tv_sec + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6, answered);
	return 0;
}
