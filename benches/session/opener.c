/* The trace bench's workload: open() and close() a file, RATE calls a second (0: as fast as it
 * can) for SECONDS, then MARKER opened ten times 20 ms apart (a path the event counter watches
 * for: events of one cgroup arrive in order, so once a marker is printed every call before it
 * has been). Prints "calls start_s end_s cpu_s": the loop's calls, its wall-clock start and end
 * (CLOCK_REALTIME, seconds) and the process's CPU time (user + system) for the loop alone.
 * Pacing reads the vDSO clock (no syscall, so no trace probe runs for it) and sleeps with
 * nanosleep when ahead. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static double now(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: opener RATE SECONDS PATH MARKER\n");
        return 2;
    }
    double rate = atof(argv[1]), seconds = atof(argv[2]);
    const char *path = argv[3], *marker = argv[4];
    long calls = 0;
    double cpu_start = now(CLOCK_PROCESS_CPUTIME_ID);
    double start = now(CLOCK_REALTIME), start_mono = now(CLOCK_MONOTONIC);
    for (;;) {
        double elapsed = now(CLOCK_MONOTONIC) - start_mono;
        if (elapsed >= seconds) break;
        long batch = 256;
        if (rate > 0) {
            long due = (long)(rate * elapsed) - calls;
            if (due <= 0) {
                struct timespec nap = {0, 100000};
                nanosleep(&nap, NULL);
                continue;
            }
            if (due < batch) batch = due;
        }
        for (long i = 0; i < batch; i++) {
            int fd = open(path, O_RDONLY);
            if (fd < 0) {
                perror(path);
                return 1;
            }
            close(fd);
        }
        calls += batch;
    }
    double end = now(CLOCK_REALTIME);
    double cpu = now(CLOCK_PROCESS_CPUTIME_ID) - cpu_start;
    for (int i = 0; i < 10; i++) {
        int fd = open(marker, O_RDONLY);
        if (fd >= 0) close(fd);
        struct timespec nap = {0, 20000000};
        nanosleep(&nap, NULL);
    }
    printf("%ld %.6f %.6f %.6f\n", calls, start, end, cpu);
    return 0;
}
