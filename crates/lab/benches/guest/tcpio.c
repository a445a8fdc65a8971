/* TCP throughput for the lab, one static binary for both ends (L2 guests and
 * L1 hosts carry busybox, whose nc moves 1 KiB per system call: that
 * measures the copy loop more than the network).
 *
 *   tcpio send HOST PORT MIB [WRITE]  connect, write MIB MiB of zeros in WRITE-byte
 *                                     writes (default 64 KiB), wait for the peer to
 *                                     close, print @@TCPIO-MIBS=<MiB/s>
 *   tcpio recv HOST PORT              connect, read to EOF, print @@TCPIO-MIBS
 *   tcpio sink PORT                   accept one connection, read it to EOF
 *   tcpio source PORT MIB             accept one connection, write MIB MiB, close
 *
 * With TCPIO_INFO=1 the sender also prints its TCP_INFO every 250 ms and at
 * the end (RTT, cwnd, pacing rate, and the kernel's busy / receive-window /
 * send-buffer-limited time). */
#include <arpa/inet.h>
#include <linux/tcp.h> /* the full tcp_info; glibc's is older */
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (64 * 1024)

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void report(int fd, const char *tag, double t) {
  struct tcp_info i;
  socklen_t n = sizeof i;
  memset(&i, 0, sizeof i);
  if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &i, &n) < 0) return;
  printf("@@TI-%s t=%.2f rtt=%u rttvar=%u cwnd=%u ssthresh=%u unacked=%u mss=%u pacing=%llu deliv=%llu "
         "busy=%llu rwnd_lim=%llu sndbuf_lim=%llu retrans=%u notsent=%u data_segs_out=%u\n",
         tag, t, i.tcpi_rtt, i.tcpi_rttvar, i.tcpi_snd_cwnd, i.tcpi_snd_ssthresh, i.tcpi_unacked, i.tcpi_snd_mss,
         (unsigned long long)i.tcpi_pacing_rate, (unsigned long long)i.tcpi_delivery_rate,
         (unsigned long long)i.tcpi_busy_time, (unsigned long long)i.tcpi_rwnd_limited,
         (unsigned long long)i.tcpi_sndbuf_limited, i.tcpi_total_retrans, i.tcpi_notsent_bytes, i.tcpi_data_segs_out);
  fflush(stdout);
}

static int dial(const char *host, const char *port) {
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
  if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
    fprintf(stderr, "tcpio: bad address %s\n", host);
    exit(2);
  }
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
    perror("tcpio: connect");
    exit(1);
  }
  return fd;
}

static int accept_one(const char *port) {
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
  int one = 1, l = socket(AF_INET, SOCK_STREAM, 0);
  if (l < 0 || setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
      bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 1) < 0) {
    perror("tcpio: listen");
    exit(1);
  }
  int fd = accept(l, NULL, NULL);
  if (fd < 0) {
    perror("tcpio: accept");
    exit(1);
  }
  close(l);
  return fd;
}

/* Writes `bytes` zeros in `chunk`-byte writes; with `info`, reports TCP_INFO. */
static void send_all(int fd, long long bytes, long chunk, int info, double t0) {
  char *buf = calloc(1, chunk);
  double next = t0 + 0.25;
  if (!buf) exit(1);
  while (bytes > 0) {
    ssize_t w = write(fd, buf, bytes < chunk ? bytes : chunk);
    if (w <= 0) {
      perror("tcpio: write");
      exit(1);
    }
    bytes -= w;
    if (info && now() >= next) {
      report(fd, "RUN", now() - t0);
      next += 0.25;
    }
  }
  free(buf);
}

/* Reads to EOF; returns the bytes read. */
static long long drain(int fd) {
  static char buf[CHUNK];
  long long total = 0;
  ssize_t r;
  while ((r = read(fd, buf, sizeof buf)) > 0) total += r;
  if (r < 0) perror("tcpio: read");
  return total;
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "";
  int info = getenv("TCPIO_INFO") && atoi(getenv("TCPIO_INFO"));
  if (!strcmp(mode, "send") && (argc == 5 || argc == 6)) {
    long long mib = atoll(argv[4]);
    long chunk = argc == 6 ? atol(argv[5]) : CHUNK;
    if (mib <= 0 || chunk <= 0) return 2;
    int fd = dial(argv[2], argv[3]);
    double t0 = now();
    send_all(fd, mib << 20, chunk, info, t0);
    shutdown(fd, SHUT_WR);
    drain(fd); /* the peer closes once it has read everything */
    double t = now() - t0;
    if (info) report(fd, "END", t);
    printf("@@TCPIO-MIBS=%.2f\n", mib / t);
    return 0;
  }
  if (!strcmp(mode, "recv") && argc == 4) {
    int fd = dial(argv[2], argv[3]);
    double t0 = now();
    long long got = drain(fd);
    printf("@@TCPIO-MIBS=%.2f\n", got / 1048576.0 / (now() - t0));
    return got > 0 ? 0 : 1;
  }
  if (!strcmp(mode, "sink") && argc == 3) {
    int fd = accept_one(argv[2]);
    drain(fd);
    close(fd);
    return 0;
  }
  if (!strcmp(mode, "source") && argc == 4) {
    long long mib = atoll(argv[3]);
    if (mib <= 0) return 2;
    int fd = accept_one(argv[2]);
    send_all(fd, mib << 20, CHUNK, 0, now());
    close(fd);
    return 0;
  }
  fprintf(stderr, "usage: tcpio send HOST PORT MIB [WRITE] | recv HOST PORT | sink PORT | source PORT MIB\n");
  return 2;
}
