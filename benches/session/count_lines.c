/* Counts the plugin's stdout lines (`-o json`: one event a line) as cheaply as a reader can.
 *   count_lines first          exits at the first line: prints its wall-clock time
 *   count_lines MARKER IDLE_S  exits at the first line containing MARKER, or IDLE_S seconds
 *                              after the last byte (the marker lost): prints "lines first_s
 *                              last_s found", lines before the marker's, the times (CLOCK_REALTIME)
 *                              of the first line and of the marker (or the last byte), found 0/1.
 * Reading stops there; the caller ends the plugin. */
#define _GNU_SOURCE
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    int first_only = argc == 2 && strcmp(argv[1], "first") == 0;
    if (!first_only && argc != 3) {
        fprintf(stderr, "usage: count_lines first | count_lines MARKER IDLE_SECONDS\n");
        return 2;
    }
    const char *marker = first_only ? "" : argv[1];
    size_t marker_len = strlen(marker);
    int idle_ms = first_only ? -1 : (int)(atof(argv[2]) * 1000);
    static char buf[1 << 16];
    /* The tail of the previous block, so a marker split across two reads is still seen. */
    char carry[512] = {0};
    size_t carried = 0;
    long lines = 0;
    double first = 0, last = 0;
    struct pollfd in = {.fd = 0, .events = POLLIN};
    for (;;) {
        int ready = poll(&in, 1, lines || first ? idle_ms : -1);
        if (ready == 0) break;
        ssize_t n = read(0, buf, sizeof buf);
        if (n <= 0) break;
        last = now();
        if (first == 0) first = last;
        if (first_only) {
            if (memchr(buf, '\n', n)) {
                printf("%.6f\n", last);
                return 0;
            }
            continue;
        }
        if (marker_len < sizeof carry && carried) {
            /* A marker straddling the blocks: look in the carry plus the block's start. */
            char joined[1024];
            size_t take = (size_t)n < marker_len ? (size_t)n : marker_len;
            memcpy(joined, carry, carried);
            memcpy(joined + carried, buf, take);
            char *h = memmem(joined, carried + take, marker, marker_len);
            if (h && h - joined < (long)carried && h + marker_len > joined + carried) {
                /* Every newline counted so far ends a line before the marker's. */
                printf("%ld %.6f %.6f 1\n", lines, first, last);
                return 0;
            }
        }
        char *hit = memmem(buf, n, marker, marker_len);
        char *end = hit ? hit : buf + n;
        for (char *p = buf; (p = memchr(p, '\n', end - p)); p++) lines++;
        if (hit) {
            printf("%ld %.6f %.6f 1\n", lines, first, last);
            return 0;
        }
        carried = n < (ssize_t)marker_len ? (size_t)n : marker_len;
        memcpy(carry, buf + n - carried, carried);
    }
    printf("%ld %.6f %.6f 0\n", lines, first, last);
    return 0;
}
