/* Load generator for bench/scaling.py: loopback only, bounded by its arguments.
 *
 *   loadgen echo HOST PORT CONNS SECONDS MSGSIZE WARMUP
 *       CONNS connections, one request of MSGSIZE bytes in flight on each; one thread, epoll.
 *       Prints one JSON line: requests in the window, p50/p99 latency (us), client CPU.
 *   loadgen bulk HOST PORT CONNS TOTAL_BYTES TLS(0|1)
 *       CONNS threads, each sends TOTAL/CONNS bytes in 1 MiB writes (over TLS if asked), shuts
 *       its write side down and waits for the server's EOF.  Prints seconds and client CPU.
 *
 * Compiled at run time by scaling.py (cc -O2 loadgen.c [-DWITH_TLS -lssl -lcrypto]).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#ifdef WITH_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static int dial(const char *host, int port) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) { fprintf(stderr, "bad host %s\n", host); exit(2); }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("connect"); exit(1); }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

#define NBUCKETS 200000 /* 1 us buckets up to 200 ms */
static uint64_t hist[NBUCKETS + 1];

struct conn { int fd; size_t got; double t0; };

static int run_echo(const char *host, int port, int nconn, double seconds, int msgsize, double warmup) {
    struct conn *cs = calloc(nconn, sizeof *cs);
    char *msg = malloc(msgsize), *buf = malloc(65536);
    memset(msg, 'x', msgsize);
    int ep = epoll_create1(0);
    for (int i = 0; i < nconn; i++) {
        cs[i].fd = dial(host, port);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev);
    }
    double start = now();
    for (int i = 0; i < nconn; i++) {
        cs[i].t0 = now();
        if (write(cs[i].fd, msg, msgsize) != msgsize) { perror("write"); return 1; }
    }
    double measure_from = start + warmup, end = measure_from + seconds;
    double cpu0 = 0, w0 = 0;
    int measuring = 0;
    uint64_t requests = 0;
    struct epoll_event evs[512];
    for (;;) {
        double t = now();
        if (!measuring && t >= measure_from) { measuring = 1; cpu0 = cpu(); w0 = t; }
        if (t >= end) break;
        int n = epoll_wait(ep, evs, 512, 100);
        if (n < 0 && errno != EINTR) { perror("epoll_wait"); return 1; }
        for (int k = 0; k < n; k++) {
            struct conn *c = &cs[evs[k].data.u32];
            ssize_t r = read(c->fd, buf, 65536);
            if (r <= 0) { fprintf(stderr, "connection %u: %s\n", evs[k].data.u32, r ? strerror(errno) : "eof"); return 1; }
            c->got += r;
            if (c->got >= (size_t)msgsize) {
                double t1 = now();
                if (measuring) {
                    uint64_t us = (uint64_t)((t1 - c->t0) * 1e6);
                    hist[us > NBUCKETS ? NBUCKETS : us]++;
                    requests++;
                }
                c->got = 0;
                c->t0 = t1;
                if (write(c->fd, msg, msgsize) != msgsize) { perror("write"); return 1; }
            }
        }
    }
    double wall = now() - w0, used = cpu() - cpu0;
    uint64_t acc = 0, p50 = 0, p99 = 0;
    int have50 = 0;
    for (int i = 0; i <= NBUCKETS; i++) {
        acc += hist[i];
        if (!have50 && acc * 2 >= requests) { p50 = i; have50 = 1; }
        if (acc * 100 >= requests * 99) { p99 = i; break; }
    }
    printf("{\"requests\": %llu, \"seconds\": %.4f, \"p50_us\": %llu, \"p99_us\": %llu, \"client_cpu\": %.4f}\n",
           (unsigned long long)requests, wall, (unsigned long long)p50, (unsigned long long)p99, used);
    for (int i = 0; i < nconn; i++) close(cs[i].fd);
    return 0;
}

struct bulkarg { const char *host; int port; long long bytes; int tls; int rc; };
#ifdef WITH_TLS
static SSL_CTX *tls_ctx;
#endif

static void *bulk_one(void *p) {
    struct bulkarg *a = p;
    int fd = dial(a->host, a->port);
    size_t chunk = 1 << 20;
    char *buf = malloc(chunk);
    memset(buf, 'b', chunk);
    long long left = a->bytes;
    if (!a->tls) {
        while (left > 0) {
            size_t n = left < (long long)chunk ? (size_t)left : chunk;
            ssize_t w = write(fd, buf, n);
            if (w <= 0) { perror("bulk write"); a->rc = 1; return NULL; }
            left -= w;
        }
        shutdown(fd, SHUT_WR);
        while (read(fd, buf, chunk) > 0) {}
    } else {
#ifdef WITH_TLS
        SSL *s = SSL_new(tls_ctx);
        SSL_set_fd(s, fd);
        if (SSL_connect(s) != 1) { ERR_print_errors_fp(stderr); a->rc = 1; return NULL; }
        while (left > 0) {
            int n = left < (long long)chunk ? (int)left : (int)chunk;
            int w = SSL_write(s, buf, n);
            if (w <= 0) { ERR_print_errors_fp(stderr); a->rc = 1; return NULL; }
            left -= w;
        }
        SSL_shutdown(s);
        shutdown(fd, SHUT_WR);
        while (SSL_read(s, buf, chunk) > 0) {}
        SSL_free(s);
#else
        a->rc = 3;
        return NULL;
#endif
    }
    close(fd);
    free(buf);
    return NULL;
}

static int run_bulk(const char *host, int port, int nconn, long long total, int tls) {
#ifdef WITH_TLS
    if (tls) {
        tls_ctx = SSL_CTX_new(TLS_client_method());
        SSL_CTX_set_min_proto_version(tls_ctx, TLS1_3_VERSION);
        SSL_CTX_set_ciphersuites(tls_ctx, "TLS_AES_128_GCM_SHA256");
        SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
    }
#endif
    pthread_t th[64];
    struct bulkarg args[64];
    double t0 = now(), c0 = cpu();
    for (int i = 0; i < nconn; i++) {
        args[i] = (struct bulkarg){host, port, total / nconn, tls, 0};
        pthread_create(&th[i], NULL, bulk_one, &args[i]);
    }
    int rc = 0;
    for (int i = 0; i < nconn; i++) { pthread_join(th[i], NULL); rc |= args[i].rc; }
    double wall = now() - t0, used = cpu() - c0;
    printf("{\"bytes\": %lld, \"seconds\": %.4f, \"client_cpu\": %.4f}\n", total, wall, used);
    return rc;
}

int main(int argc, char **argv) {
    if (argc >= 8 && !strcmp(argv[1], "echo"))
        return run_echo(argv[2], atoi(argv[3]), atoi(argv[4]), atof(argv[5]), atoi(argv[6]), atof(argv[7]));
    if (argc >= 7 && !strcmp(argv[1], "bulk")) {
        int n = atoi(argv[4]);
        if (n < 1 || n > 64) { fprintf(stderr, "1..64 connections\n"); return 2; }
        return run_bulk(argv[2], atoi(argv[3]), n, atoll(argv[5]), atoi(argv[6]));
    }
    fprintf(stderr, "usage: loadgen echo HOST PORT CONNS SECONDS MSGSIZE WARMUP | bulk HOST PORT CONNS BYTES TLS\n");
    return 2;
}
