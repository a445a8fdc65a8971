/* diskio: timed O_DIRECT I/O on a block device, for the virtio benchmark.
 * usage: diskio seqread|seqwrite|randread|randwrite DEVICE BLOCK_BYTES SECONDS
 * prints: "<mode> <ops/s> <MiB/s>" */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: diskio MODE DEVICE BLOCK SECONDS\n");
        return 2;
    }
    const char *mode = argv[1];
    int write = strstr(mode, "write") != NULL, random = strncmp(mode, "rand", 4) == 0;
    size_t block = strtoul(argv[3], NULL, 0);
    double seconds = atof(argv[4]);
    int fd = open(argv[2], (write ? O_WRONLY : O_RDONLY) | O_DIRECT);
    if (fd < 0) { perror(argv[2]); return 1; }
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0) { perror("BLKGETSIZE64"); return 1; }
    uint64_t blocks = size / block;
    void *buf;
    if (posix_memalign(&buf, 4096, block)) return 1;
    memset(buf, 0x5a, block);
    uint64_t x = 88172645463325252ull, ops = 0, next = 0;
    double start = now(), end = start + seconds;
    while (now() < end) {
        for (int i = 0; i < 16; i++) {
            uint64_t b;
            if (random) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; b = x % blocks; }
            else { b = next++ % blocks; }
            ssize_t n = write ? pwrite(fd, buf, block, b * block) : pread(fd, buf, block, b * block);
            if (n != (ssize_t)block) { perror("io"); return 1; }
            ops++;
        }
    }
    double took = now() - start;
    printf("%s %.0f %.1f\n", mode, ops / took, ops * (double)block / took / 1048576.0);
    return 0;
}
