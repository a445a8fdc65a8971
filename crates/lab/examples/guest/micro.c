/* Per-operation costs inside a lab guest, to tell a VMM that makes every
 * guest operation slower (CPU features, mitigations, memory backing) from
 * one whose devices cost more. Prints "@@MICRO name value unit" lines.
 * Static, no libc beyond syscalls the kernel always has. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static void report(const char *name, double ns, long n, const char *unit) {
    printf("@@MICRO %s %.1f %s\n", name, ns / n, unit);
    fflush(stdout);
}

int main(void) {
    volatile unsigned long sink = 0;
    double t;

    long n = 50 * 1000 * 1000;
    t = now();
    for (long i = 0; i < n; i++) sink += i * 2654435761UL;
    report("compute", now() - t, n, "ns/iter");

    n = 200 * 1000;
    t = now();
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    report("syscall", now() - t, n, "ns/call");

    n = 1000 * 1000;
    t = now();
    for (long i = 0; i < n; i++) { struct timespec x; clock_gettime(CLOCK_MONOTONIC, &x); }
    report("clock_gettime", now() - t, n, "ns/call");

    size_t len = 64 << 20;
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 1;
    t = now();
    for (size_t off = 0; off < len; off += 4096) p[off] = 1;
    report("first_touch", now() - t, len / 4096, "ns/page");
    munmap(p, len);
    p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 1;
    t = now();
    for (size_t off = 0; off < len; off += 4096) p[off] = 1;
    report("retouch", now() - t, len / 4096, "ns/page");
    munmap(p, len);

    int ab[2], ba[2];
    if (pipe(ab) || pipe(ba)) return 1;
    n = 5000;
    pid_t child = fork();
    if (child == 0) {
        char c;
        for (long i = 0; i < n; i++) {
            if (read(ab[0], &c, 1) != 1 || write(ba[1], &c, 1) != 1) _exit(1);
        }
        _exit(0);
    }
    char c = 'x';
    t = now();
    for (long i = 0; i < n; i++) {
        if (write(ab[1], &c, 1) != 1 || read(ba[0], &c, 1) != 1) return 1;
    }
    report("pipe_roundtrip", now() - t, n, "ns/rt");
    waitpid(child, NULL, 0);
    return 0;
}
