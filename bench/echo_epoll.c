/* The floor for bench/scaling.py: a C echo (or discard) server, one thread, epoll.
 *
 *   echo_epoll --port P --mode echo|discard
 *
 * Listens on 127.0.0.1:P, prints "ready P", serves until SIGTERM.  Level-triggered epoll,
 * non-blocking sockets, one read (64 KiB) and one write per readiness, as the Python servers
 * do.  Compiled at run time by scaling.py (cc -O2).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv) {
    int port = 0, echo = 1;
    for (int i = 1; i + 1 < argc; i++) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--mode")) echo = !strcmp(argv[++i], "echo");
    }
    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 1024) < 0) {
        perror("listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    printf("ready %d\n", port);
    fflush(stdout);
    static char buf[1 << 20];
    size_t want = echo ? 65536 : sizeof buf;
    struct epoll_event evs[512];
    while (!stop) {
        int n = epoll_wait(ep, evs, 512, 200);
        for (int k = 0; k < n; k++) {
            int fd = evs[k].data.fd;
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t r = read(fd, buf, want);
            if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                close(fd);
                continue;
            }
            if (r > 0 && echo) {
                ssize_t off = 0;
                while (off < r) {  /* a 64-byte echo always fits; a full buffer would spin here */
                    ssize_t w = write(fd, buf + off, r - off);
                    if (w < 0 && errno != EAGAIN && errno != EINTR) break;
                    if (w > 0) off += w;
                }
            }
        }
    }
    return 0;
}
