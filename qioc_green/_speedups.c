/* qioc_green._speedups: the optional compiled hot path (CPython's C API, no other dependency).
 *
 * Two things, both used only when this module was built and QIOC_PURE_PYTHON is not set:
 *
 * 1. Non-blocking syscalls into caller buffers, *with the GIL held* (up to 64 KiB a call).  The fds are always
 *    non-blocking (a channel's are), so the kernel never sleeps in them: releasing the GIL
 *    around each one buys nothing and, with several hub threads, hands the GIL to another
 *    thread at every call (a futex wake and a context switch: the convoy of PERF-NOTES).
 *    "Would block" is a return code (-1, or None where the call returns an object), never an
 *    exception: raising and catching BlockingIOError costs more than the syscall.  Any other
 *    error raises OSError (its errno subclass), as the socket module would; EINTR runs the
 *    signal handlers (PEP 475) and retries.  The part of a transfer beyond 64 KiB is copied with
 *    the GIL released (a 1 MiB copy takes ~100 us, long enough for another hub to use it).
 *
 * 2. One GIL acquisition per hub loop iteration (hook_loop).  gevent runs libev's ev_run()
 *    without the GIL and takes it again in every watcher callback (PyGILState_Ensure/Release
 *    per callback).  hook_loop() installs, on one hub's libev loop, an invoke-pending callback
 *    that takes the GIL once, runs every pending watcher of the iteration under it (gevent's
 *    per-callback Ensure/Release then only count), and releases it before the loop polls
 *    again.  So a hub holds the GIL for its whole batch of ready watchers and releases it
 *    where it would sleep; it still releases it wherever Python code does (TLS, file I/O,
 *    os.sched_yield), so work that releases the GIL still overlaps.
 *
 *    Fairness between hubs ("fair"): a hub that ends a batch while other hooked hubs wait for
 *    the GIL does not take it again before one of them has had it (a bounded wait, 2 ms, on a
 *    futex), so hubs take turns per batch rather than one keeping the GIL until CPython's
 *    5 ms switch interval forces it out (PERF-NOTES: p99 of 5-14 ms without that).
 *
 *    The libev entry points come from gevent's own extension (gevent.libev.corecext exports
 *    ev_set_invoke_pending_cb and ev_invoke_pending); hook_loop is told that file's path and
 *    finds them with dlopen(RTLD_NOLOAD).  Where they cannot be found (another loop
 *    implementation), hook_loop returns False and nothing changes.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

/* The METH_* signatures pass every method the module (self), and METH_NOARGS an unused
 * argument: -Wextra's unused-parameter says nothing of use here; -Wall -Wextra is clean otherwise. */
#pragma GCC diagnostic ignored "-Wunused-parameter"

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_IOV 64     /* buffers per readv/writev call; more are left for the next call */
#define MAX_FDS 16     /* fds in one message (QEMU's limit) */

/* Py_IsFinalizing() is public from 3.13, which removed _Py_IsFinalizing(). */
#if PY_VERSION_HEX >= 0x030D0000
#define is_finalizing() Py_IsFinalizing()
#else
#define is_finalizing() _Py_IsFinalizing()
#endif

/* -- helpers ------------------------------------------------------------------------------ */

/* errno after a failed call: 1 = retry (EINTR, handlers ran), 0 = would block, -1 = raised. */
static int
failed(void)
{
    int e = errno;
    if (e == EAGAIN || e == EWOULDBLOCK)
        return 0;
    if (e == EINTR) {
        if (PyErr_CheckSignals() < 0)
            return -1;
        return 1;
    }
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

static int
as_fd(PyObject *o, int *fd)
{
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "bad file descriptor");
        return -1;
    }
    *fd = (int)v;
    return 0;
}

/* The calls' common arguments: exactly `want` of them, an fd first, and (if flags_at > 0) an
 * int of flags at that index.  0, or -1 with an exception set. */
static int
fd_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *usage, int *fd,
        Py_ssize_t flags_at, int *flags)
{
    if (nargs != want) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    if (as_fd(args[0], fd) < 0)
        return -1;
    if (flags_at > 0) {
        *flags = (int)PyLong_AsLong(args[flags_at]);
        if (*flags == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* Fill iov from a sequence of buffers (at most MAX_IOV); returns how many, -1 on error. */
static Py_ssize_t
get_buffers(PyObject *seq, Py_buffer *views, struct iovec *iov, int writable)
{
    PyObject *fast = PySequence_Fast(seq, "buffers must be a sequence");
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > MAX_IOV)
        n = MAX_IOV;
    PyObject **items = PySequence_Fast_ITEMS(fast);
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        if (PyObject_GetBuffer(items[i], &views[i], writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
            while (--i >= 0)
                PyBuffer_Release(&views[i]);
            Py_DECREF(fast);
            return -1;
        }
        iov[i].iov_base = views[i].buf;
        iov[i].iov_len = (size_t)views[i].len;
    }
    Py_DECREF(fast);
    return n;
}

static void
release_buffers(Py_buffer *views, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
}

/* -- the syscalls --------------------------------------------------------------------------- */

/* Transfers above this size release the GIL while the kernel copies (a 1 MiB copy takes
 * ~100 us: another hub may run meanwhile); smaller ones keep it. */
#define BIG 65536
#define SMALL 8192

/* recv(2) into buf, the GIL held or (release) released for the call; >= 0 bytes, -1 would
 * block, -2 raised. */
static ssize_t
recv_loop(int fd, char *buf, size_t n, int flags, int release)
{
    for (;;) {
        ssize_t got;
        if (release) {
            Py_BEGIN_ALLOW_THREADS
            got = recv(fd, buf, n, flags);
            Py_END_ALLOW_THREADS
        } else {
            got = recv(fd, buf, n, flags);
        }
        if (got >= 0)
            return got;
        int r = failed();
        if (r <= 0)
            return r == 0 ? -1 : -2;
    }
}

#define recv_held(fd, buf, n, flags) recv_loop((fd), (buf), (n), (flags), 0)
#define recv_released(fd, buf, n, flags) recv_loop((fd), (buf), (n), (flags), 1)

/* How many bytes are queued to read on fd (FIONREAD); 0 if none or if it cannot say. */
static size_t
queued(int fd)
{
    int avail = 0;
    if (ioctl(fd, FIONREAD, &avail) < 0 || avail < 0)
        return 0;
    return (size_t)avail;
}

/* After a first part of a read came whole (got bytes are in hand), the call for the rest
 * failed: keep the bytes in hand rather than report them lost.  An OSError is dropped (with
 * bytes queued, as queued() made sure, the kernel reports no error: this is a safety net); an
 * exception from a signal handler is not.  Returns got, or -2 (raised). */
static ssize_t
keep_first_part(ssize_t got)
{
    if (!PyErr_ExceptionMatches(PyExc_OSError))
        return -2;
    PyErr_Clear();
    return got;
}

/* A read of up to n bytes into buf: the first BIG bytes with the GIL held, the rest (if the
 * first part came whole, more is wanted and more is queued) released.  MSG_PEEK reads once.
 *
 * The rest only if more is queued: a recv(2) that finds the queue empty reports (and clears)
 * a pending error, ECONNRESET from a peer that closed with our bytes unread say, and the
 * bytes of the first part would be lost behind it; socket.recv returns them and raises the
 * reset at the next call, and so must this. */
static ssize_t
recv_into_buf(int fd, char *buf, size_t n, int flags)
{
    if (n <= BIG || (flags & MSG_PEEK))
        return recv_held(fd, buf, n, flags);
    ssize_t got = recv_held(fd, buf, BIG, flags);
    if (got != BIG || queued(fd) == 0)
        return got;
    ssize_t more = recv_released(fd, buf + BIG, n - BIG, flags);
    if (more == -2)
        return keep_first_part(BIG);
    return more > 0 ? BIG + more : BIG;  /* would block or EOF after the first part: what came */
}

PyDoc_STRVAR(recv_doc,
"recv(fd, n, flags) -> bytes, or None if it would block.  A non-blocking recv(2), GIL held\n"
"(released for the part of a read beyond 64 KiB).");

static PyObject *
sp_recv(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int fd, flags;
    Py_ssize_t n;
    if (fd_args(args, nargs, 3, "recv(fd, n, flags)", &fd, 2, &flags) < 0)
        return NULL;
    n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative size");
        return NULL;
    }
    if ((flags & MSG_PEEK) && n > SMALL) {
        /* A peek reads once, from the start of the queue: into an object of n (a rare call; a
         * MemoryError here has taken nothing). */
        PyObject *buf = PyBytes_FromStringAndSize(NULL, n);
        if (buf == NULL)
            return NULL;
        ssize_t got = recv_held(fd, PyBytes_AS_STRING(buf), (size_t)n, flags);
        if (got < 0) {
            Py_DECREF(buf);
            if (got == -1)
                Py_RETURN_NONE;
            return NULL;
        }
        if (got != n && _PyBytes_Resize(&buf, got) < 0)
            return NULL;
        return buf;
    }
    /* The first SMALL bytes go through a stack buffer: the common case is a short message,
     * and a bytes object of n (64 KiB, say) allocated and shrunk per request costs more than
     * the copy.  Only a read that fills it and wants more allocates n. */
    char small[SMALL];
    ssize_t got = recv_held(fd, small, (size_t)(n < SMALL ? n : SMALL), flags);
    if (got == -1)
        Py_RETURN_NONE;
    if (got < 0)
        return NULL;
    if (got < SMALL || n <= SMALL)
        return PyBytes_FromStringAndSize(small, got);
    /* The SMALL bytes in hand must reach the caller whatever happens next: the rest is read
     * only if more is queued (see recv_into_buf: an empty queue may hold a pending error), and
     * the bytes object is sized by what is queued, so a huge n allocates no more than came. */
    size_t avail = queued(fd);
    if (avail == 0)
        return PyBytes_FromStringAndSize(small, SMALL);
    size_t want = (size_t)(n - SMALL) < avail ? (size_t)(n - SMALL) : avail;
    PyObject *buf = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(SMALL + want));
    if (buf == NULL) {  /* no memory for the rest: return the first part alone */
        PyErr_Clear();
        return PyBytes_FromStringAndSize(small, SMALL);
    }
    memcpy(PyBytes_AS_STRING(buf), small, SMALL);
    ssize_t more = recv_into_buf(fd, PyBytes_AS_STRING(buf) + SMALL, want, flags);
    if (more == -2 && keep_first_part(0) < 0) {
        Py_DECREF(buf);
        return NULL;
    }
    got = SMALL + (more > 0 ? more : 0);
    if (got != SMALL + (ssize_t)want && _PyBytes_Resize(&buf, got) < 0)
        return NULL;
    return buf;
}

PyDoc_STRVAR(recv_into_doc,
"recv_into(fd, buffer, flags) -> bytes read, or -1 if it would block.  GIL held (released\n"
"for the part of a read beyond 64 KiB).");

static PyObject *
sp_recv_into(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int fd, flags;
    Py_buffer view;
    if (fd_args(args, nargs, 3, "recv_into(fd, buffer, flags)", &fd, 2, &flags) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_WRITABLE) < 0)
        return NULL;
    ssize_t got = recv_into_buf(fd, view.buf, (size_t)view.len, flags);
    PyBuffer_Release(&view);
    if (got == -2)
        return NULL;
    return PyLong_FromSsize_t(got);
}

PyDoc_STRVAR(send_doc,
"send(fd, buffer) -> bytes written, or -1 if it would block.  send(2) with MSG_NOSIGNAL, GIL\n"
"held (released for buffers over 64 KiB).");

static PyObject *
sp_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    Py_buffer view;
    if (fd_args(args, nargs, 2, "send(fd, buffer)", &fd, 0, NULL) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    for (;;) {
        ssize_t put;
        if (view.len > BIG) {
            Py_BEGIN_ALLOW_THREADS
            put = send(fd, view.buf, (size_t)view.len, MSG_NOSIGNAL);
            Py_END_ALLOW_THREADS
        } else {
            put = send(fd, view.buf, (size_t)view.len, MSG_NOSIGNAL);
        }
        if (put >= 0) {
            PyBuffer_Release(&view);
            return PyLong_FromSsize_t(put);
        }
        int r = failed();
        if (r <= 0) {
            PyBuffer_Release(&view);
            return r == 0 ? PyLong_FromLong(-1) : NULL;
        }
    }
}

PyDoc_STRVAR(recvmsg_doc,
"recvmsg(fd, buffers, max_fds, flags) -> (bytes read, [fds]), or None if it would block.\n\n"
"recvmsg(2) into up to 64 buffers (readv), taking up to max_fds passed fds (SCM_RIGHTS,\n"
"close-on-exec).  GIL held.");

static PyObject *
sp_recvmsg(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int fd, max_fds, flags;
    Py_buffer views[MAX_IOV];
    struct iovec iov[MAX_IOV];
    union {
        char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    if (fd_args(args, nargs, 4, "recvmsg(fd, buffers, max_fds, flags)", &fd, 3, &flags) < 0)
        return NULL;
    max_fds = (int)PyLong_AsLong(args[2]);
    if (max_fds == -1 && PyErr_Occurred())
        return NULL;
    if (max_fds > MAX_FDS)
        max_fds = MAX_FDS;
    Py_ssize_t nv = get_buffers(args[1], views, iov, 1);
    if (nv < 0)
        return NULL;
    size_t total = 0;
    for (Py_ssize_t i = 0; i < nv; i++)
        total += iov[i].iov_len;
    struct msghdr msg;
    ssize_t got;
    for (;;) {
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)nv;
        if (max_fds > 0) {
            msg.msg_control = control.buf;
            /* CMSG_LEN, not CMSG_SPACE: the kernel installs as many fds as the buffer has room
               for, and CMSG_SPACE's padding holds one more when max_fds is odd.  With exactly
               max_fds' room it closes the rest (MSG_CTRUNC). */
            msg.msg_controllen = CMSG_LEN((size_t)max_fds * sizeof(int));
        }
        if (total > BIG) {
            Py_BEGIN_ALLOW_THREADS
            got = recvmsg(fd, &msg, flags | (max_fds > 0 ? MSG_CMSG_CLOEXEC : 0));
            Py_END_ALLOW_THREADS
        } else {
            got = recvmsg(fd, &msg, flags | (max_fds > 0 ? MSG_CMSG_CLOEXEC : 0));
        }
        if (got >= 0)
            break;
        int r = failed();
        if (r <= 0) {
            release_buffers(views, nv);
            if (r == 0)
                Py_RETURN_NONE;
            return NULL;
        }
    }
    release_buffers(views, nv);
    PyObject *fds = PyList_New(0);
    if (fds == NULL)
        goto close_fds;
    if (max_fds > 0) {
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int *p = (int *)CMSG_DATA(c);
            for (size_t i = 0; i < count; i++) {
                int one;
                memcpy(&one, p + i, sizeof one);
                if (PyList_GET_SIZE(fds) >= max_fds) {
                    close(one); /* never more than asked for, and never left open */
                    continue;
                }
                PyObject *v = PyLong_FromLong(one);
                if (v == NULL || PyList_Append(fds, v) < 0) {
                    Py_XDECREF(v);
                    Py_CLEAR(fds);
                    goto close_fds;
                }
                Py_DECREF(v);
            }
        }
    }
    return Py_BuildValue("(nN)", (Py_ssize_t)got, fds);
close_fds:
    /* out of memory: the fds must not leak (none was closed above yet: extras are closed only
       once the list is full, and nothing is allocated after that) */
    if (max_fds > 0) {
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                int *p = (int *)CMSG_DATA(c);
                for (size_t i = 0; i < count; i++) {
                    int one;
                    memcpy(&one, p + i, sizeof one);
                    close(one);
                }
            }
        }
    }
    return NULL;
}

PyDoc_STRVAR(sendmsg_doc,
"sendmsg(fd, buffers, fds, flags) -> bytes written, or -1 if it would block.\n\n"
"sendmsg(2) from up to 64 buffers (writev), passing fds (SCM_RIGHTS) if any, with flags\n"
"(MSG_ZEROCOPY...) and MSG_NOSIGNAL.  GIL held.");

static PyObject *
sp_sendmsg(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int fd, flags;
    Py_buffer views[MAX_IOV];
    struct iovec iov[MAX_IOV];
    union {
        char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    int fdv[MAX_FDS];
    Py_ssize_t nfds = 0;
    if (fd_args(args, nargs, 4, "sendmsg(fd, buffers, fds, flags)", &fd, 3, &flags) < 0)
        return NULL;
    PyObject *fast = PySequence_Fast(args[2], "fds must be a sequence");
    if (fast == NULL)
        return NULL;
    nfds = PySequence_Fast_GET_SIZE(fast);
    if (nfds > MAX_FDS) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "at most %d fds in one message", MAX_FDS);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nfds; i++) {
        /* As the pure path has them: a negative fd is the kernel's EBADF (nothing is sent),
         * one beyond an int does not fit (array("i") raises OverflowError). */
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return NULL;
        }
        if (v < 0 || v > INT_MAX) {
            Py_DECREF(fast);
            if (v > INT_MAX) {
                PyErr_SetString(PyExc_OverflowError, "signed integer is greater than maximum");
            } else {
                errno = EBADF;
                PyErr_SetFromErrno(PyExc_OSError);
            }
            return NULL;
        }
        fdv[i] = (int)v;
    }
    Py_DECREF(fast);
    Py_ssize_t nv = get_buffers(args[1], views, iov, 0);
    if (nv < 0)
        return NULL;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)nv;
    if (nfds > 0) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fdv, (size_t)nfds * sizeof(int));
    }
    size_t total = 0;
    for (Py_ssize_t i = 0; i < nv; i++)
        total += iov[i].iov_len;
    for (;;) {
        ssize_t put;
        if (total > BIG) {
            Py_BEGIN_ALLOW_THREADS
            put = sendmsg(fd, &msg, flags | MSG_NOSIGNAL);
            Py_END_ALLOW_THREADS
        } else {
            put = sendmsg(fd, &msg, flags | MSG_NOSIGNAL);
        }
        if (put >= 0) {
            release_buffers(views, nv);
            return PyLong_FromSsize_t(put);
        }
        int r = failed();
        if (r <= 0) {
            release_buffers(views, nv);
            return r == 0 ? PyLong_FromLong(-1) : NULL;
        }
    }
}

/* -- one GIL acquisition per loop iteration ------------------------------------------------- */

struct ev_loop;
typedef void (*invoke_cb_t)(struct ev_loop *);
static void (*set_invoke_pending_cb)(struct ev_loop *, invoke_cb_t);
static void (*invoke_pending)(struct ev_loop *);

static atomic_int hubs_waiting;    /* hooked hubs blocked taking the GIL for a batch */
static atomic_uint batches;        /* batches started by hooked hubs (a futex word) */
static atomic_int futex_sleepers;  /* hubs in the fairness wait */
static atomic_ulong handoffs;      /* fairness waits taken */
static atomic_ulong handoff_timeouts;

static __thread int owe;           /* this hub ended a batch while another waited */
static __thread int my_batches;    /* this (auto) hub is in a batch: its share of in_batch */
static __thread unsigned owe_gen;  /* ... at this batch count */
static __thread int thread_fair = 1;

static void
wait_turn(void)
{
    /* Let a hub that waited while we held the GIL have it first: wait (at most 2 ms) until
     * the batch count moves past what it was when we released. */
    owe = 0;
    if (atomic_load(&batches) != owe_gen || atomic_load(&hubs_waiting) == 0)
        return;
    atomic_fetch_add(&handoffs, 1);
    struct timespec deadline, now;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_nsec += 2000000;
    if (deadline.tv_nsec >= 1000000000) {
        deadline.tv_sec += 1;
        deadline.tv_nsec -= 1000000000;
    }
    atomic_fetch_add(&futex_sleepers, 1);
    while (atomic_load(&batches) == owe_gen && atomic_load(&hubs_waiting) > 0) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        long ns = (deadline.tv_sec - now.tv_sec) * 1000000000L + (deadline.tv_nsec - now.tv_nsec);
        if (ns <= 0) {
            atomic_fetch_add(&handoff_timeouts, 1);
            break;
        }
        struct timespec rel = {ns / 1000000000L, ns % 1000000000L};
        syscall(SYS_futex, &batches, FUTEX_WAIT_PRIVATE, owe_gen, &rel, NULL, 0);
    }
    atomic_fetch_sub(&futex_sleepers, 1);
}

/* -- placement chosen by measurement ("auto" pools) ------------------------------------------
 *
 * Hub threads of a pool left to choose ("auto") start where the scheduler puts them.  Every
 * ~100 ms one of them looks at how long the auto hubs spent waiting for the GIL at the start of
 * their batches, over the time passed.  Above HIGH (hubs mostly wait for each other: the work
 * is Python-bound, and two CPUs only hand the GIL back and forth) they are all pinned to the
 * CPU others use least, and each yields that CPU after every batch, so they take turns
 * at batch boundaries (PERF-NOTES: 1.0x of one hub with a p99 of 0.48 ms).  Pinned, that wait
 * is small by construction; what shows work that releases the GIL there is a hub taking the
 * GIL while another's batch is still under way (that batch gave it up, and shares the CPU):
 * above OVERLAP of the batches, they spread at once.  And every PROBE_NS (doubling to 32 s
 * while the answer stays the same) they spread for one window (150 ms): where the work now
 * releases the GIL (TLS, file reads, large copies) they wait little, stay spread and overlap on
 * several CPUs.  Every MOVE_NS pinned, they move to another CPU if others (not this process:
 * another program, a load generator) take MOVE more of theirs than of the quietest, and
 * spread if others keep every CPU more than BUSY busy (nor do they pin then).  CPU use
 * comes from /proc/stat and /proc/self/task/ (tick-grained: 10 ms).
 */
#define WINDOW_NS 100000000L    /* 100 ms between looks */
#define PROBE_WINDOW_NS 150000000L  /* spread threads take a while to be moved apart */
#define PROBE_NS 4000000000L
#define PROBE_MAX_NS 32000000000L
#define OVERLAP 0.05            /* pinned: batches begun while another hub's was under way */
#define MOVE_NS 500000000L      /* pinned: how often to look at what others use of the CPUs */
#define MOVE 0.25               /* ... and how much busier than the quietest ours must be */
#define BUSY 0.5                /* others use every CPU more than this: stay spread */
static double HIGH = 0.25;      /* GIL wait per second of the auto hubs, in seconds
                                 * (QIOC_AUTO_HIGH overrides it: experiments only) */

static atomic_int place_mode;          /* 0 spread, 1 pinned */
static atomic_int place_cpu = -1;
static atomic_long window_start;       /* ns, monotonic */
static atomic_long wait_ns;            /* GIL waits of auto hubs in this window */
static atomic_int window_busy;         /* a hub is evaluating */
static long probe_at, probe_every = PROBE_NS, probe_until;
static atomic_ulong pins, spreads, moves;
static long loads_since;               /* when the CPU loads were last remembered */
static double last_contention;
static atomic_int auto_hubs;
static atomic_int in_batch;            /* auto hubs between taking the GIL and giving it back */
static atomic_long window_batches, window_overlaps;
static double last_overlap;

static int trace_placement;            /* QIOC_PLACEMENT_TRACE: one line per look, on stderr */
static __thread int thread_auto;       /* this hub is one of an auto pool's */
static __thread int applied = 0;       /* the mode this thread has applied */
static __thread int applied_cpu = -1;  /* ... and the CPU, when pinned */
static __thread cpu_set_t spread_set;  /* its affinity before it was pinned */

static long
now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Per-CPU busy and total jiffies from /proc/stat; returns how many CPUs were read. */
#define MAX_CPUS 256
static int
read_cpu_times(unsigned long long *busy, unsigned long long *total)
{
    FILE *f = fopen("/proc/stat", "re");
    if (f == NULL)
        return 0;
    char line[512];
    int n = 0;
    while (fgets(line, sizeof line, f) != NULL) {
        unsigned cpu;
        unsigned long long v[8] = {0};
        if (strncmp(line, "cpu", 3) != 0 || line[3] < '0' || line[3] > '9')
            continue;
        if (sscanf(line + 3, "%u %llu %llu %llu %llu %llu %llu %llu %llu", &cpu, &v[0], &v[1], &v[2],
                   &v[3], &v[4], &v[5], &v[6], &v[7]) < 5 || cpu >= MAX_CPUS)
            continue;
        busy[cpu] = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
        total[cpu] = busy[cpu] + v[3] + v[4];
        if ((int)cpu + 1 > n)
            n = (int)cpu + 1;
    }
    fclose(f);
    return n;
}

static unsigned long long prev_busy[MAX_CPUS], prev_total[MAX_CPUS];

/* Each thread's CPU time (jiffies) since the last call, counted on the CPU it now runs on. */
#define MAX_TASKS 256
static long task_ids[MAX_TASKS];
static unsigned long long task_times[MAX_TASKS];
static int ntasks;

static void
own_deltas(unsigned long long *own)
{
    DIR *d = opendir("/proc/self/task");
    if (d == NULL)
        return;
    long ids[MAX_TASKS];
    unsigned long long times[MAX_TASKS];
    int n = 0;
    struct dirent *e;
    char path[64], buf[1024];
    while ((e = readdir(d)) != NULL && n < MAX_TASKS) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        snprintf(path, sizeof path, "/proc/self/task/%.20s/stat", e->d_name);
        FILE *f = fopen(path, "re");
        if (f == NULL)
            continue;
        size_t len = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[len] = 0;
        char *p = strrchr(buf, ')');  /* the name may hold spaces */
        if (p == NULL)
            continue;
        /* after the name: state is field 3 ... utime 14, stime 15 ... processor 39 */
        unsigned long long ut = 0, st = 0;
        int cpu = -1, field = 2;
        char *save = NULL;
        for (char *tok = strtok_r(p + 1, " ", &save); tok != NULL; tok = strtok_r(NULL, " ", &save)) {
            field++;
            if (field == 14)
                ut = strtoull(tok, NULL, 10);
            else if (field == 15)
                st = strtoull(tok, NULL, 10);
            else if (field == 39) {
                cpu = atoi(tok);
                break;
            }
        }
        long id = atol(e->d_name);
        ids[n] = id;
        times[n] = ut + st;
        for (int i = 0; i < ntasks; i++) {
            if (task_ids[i] == id) {
                if (own != NULL && cpu >= 0 && cpu < MAX_CPUS && times[n] >= task_times[i])
                    own[cpu] += times[n] - task_times[i];
                break;
            }
        }
        n++;
    }
    closedir(d);
    memcpy(task_ids, ids, sizeof(long) * (size_t)n);
    memcpy(task_times, times, sizeof(unsigned long long) * (size_t)n);
    ntasks = n;
}

/* What others (not this process) used of each allowed CPU since the last look, as a fraction
 * (-1 for a CPU we may not use).  Our own threads' time is taken off the CPU each runs on now
 * (approximate: a thread may have moved meanwhile).  Returns the number of CPUs. */
static int
others_load(double *load)
{
    unsigned long long busy[MAX_CPUS] = {0}, total[MAX_CPUS] = {0}, own[MAX_CPUS] = {0};
    int n = read_cpu_times(busy, total);
    own_deltas(own);
    for (int c = 0; c < n; c++) {
        load[c] = -1.0;
        if (!CPU_ISSET(c, &spread_set) || total[c] <= prev_total[c])
            continue;
        load[c] = ((double)(busy[c] - prev_busy[c]) - (double)own[c]) / (double)(total[c] - prev_total[c]);
    }
    return n;
}

/* The allowed CPU that others used least since the last look (the deciding hub's if none);
 * -1 if others keep every allowed CPU more than BUSY busy (pinning would only lose there). */
static int
quietest_cpu(void)
{
    double load[MAX_CPUS];
    int n = others_load(load), best = sched_getcpu();
    double best_load = 1e9;
    for (int c = 0; c < n; c++) {
        if (load[c] >= 0.0 && load[c] < best_load) {
            best_load = load[c];
            best = c;
        }
    }
    return best_load < 1e9 && best_load > BUSY ? -1 : best;
}

static void
remember_cpu_times(void)
{
    read_cpu_times(prev_busy, prev_total);
    own_deltas(NULL);
}

static void
evaluate(long now)
{
    long start = atomic_load(&window_start);
    long span = now - start;
    int mode = atomic_load(&place_mode);
    if (span < (probe_until ? PROBE_WINDOW_NS : WINDOW_NS))
        return;
    int expected = 0;
    if (!atomic_compare_exchange_strong(&window_busy, &expected, 1))
        return;
    if (atomic_load(&window_start) != start) {  /* another hub evaluated meanwhile */
        atomic_store(&window_busy, 0);
        return;
    }
    double c = (double)atomic_exchange(&wait_ns, 0) / (double)span;
    long nb = atomic_exchange(&window_batches, 0), no = atomic_exchange(&window_overlaps, 0);
    double ov = nb ? (double)no / (double)nb : 0.0;
    last_contention = c;
    last_overlap = ov;
    if (trace_placement)
        fprintf(stderr, "qioc placement: %s%s, GIL wait %.3f s/s, overlapping batches %.3f, over %ld ms\n",
                mode ? "pinned" : "spread", probe_until ? " (probe)" : "", c, ov, span / 1000000);
    if (probe_until) {  /* a probe window (spread) ended */
        probe_until = 0;
        int cpu = c > HIGH ? quietest_cpu() : -1;
        if (cpu >= 0) {  /* still Python-bound: back to one CPU, look again later */
            atomic_store(&place_cpu, cpu);
            probe_every = probe_every * 2 > PROBE_MAX_NS ? PROBE_MAX_NS : probe_every * 2;
            probe_at = now + probe_every;
            atomic_store(&place_mode, 1);
        } else {
            probe_every = PROBE_NS;
            atomic_fetch_add(&spreads, 1);
        }
    } else if (mode == 0 && c > HIGH && atomic_load(&auto_hubs) > 1) {
        int cpu = quietest_cpu();
        if (cpu >= 0) {
            atomic_store(&place_cpu, cpu);
            atomic_store(&place_mode, 1);
            atomic_fetch_add(&pins, 1);
            probe_at = now + probe_every;
        }
    } else if (mode == 1 && ov > OVERLAP) {
        /* Pinned, and hubs keep getting the GIL while another is in the middle of its batch:
         * that batch gave the GIL up (work that releases it) yet shares the CPU.  Spread. */
        probe_every = PROBE_NS;
        atomic_store(&place_mode, 0);
        atomic_fetch_add(&spreads, 1);
    } else if (mode == 1 && now - loads_since >= MOVE_NS) {
        /* Pinned where others now take much of the CPU (another process, a load generator):
         * move to a CPU they leave alone, if there is a clearly quieter one. */
        double load[MAX_CPUS];
        int n = others_load(load), cpu = atomic_load(&place_cpu), best = cpu;
        for (int k = 0; k < n; k++)
            if (load[k] >= 0.0 && (best < 0 || best >= n || load[best] < 0.0 || load[k] < load[best]))
                best = k;
        if (trace_placement)
            fprintf(stderr, "qioc placement: others use CPU %d %.2f, the quietest (%d) %.2f\n", cpu,
                    cpu >= 0 && cpu < n ? load[cpu] : -1.0, best, best >= 0 && best < n ? load[best] : -1.0);
        if (best >= 0 && best < n && load[best] > BUSY) {
            /* others keep every CPU busy: a pinned pool only gets a share of one */
            probe_every = PROBE_NS;
            atomic_store(&place_mode, 0);
            atomic_fetch_add(&spreads, 1);
        } else if (cpu >= 0 && cpu < n && best != cpu && load[cpu] - load[best] > MOVE) {
            atomic_store(&place_cpu, best);
            atomic_fetch_add(&moves, 1);
        }
        loads_since = now;
        remember_cpu_times();
    } else if (mode == 1 && now >= probe_at) {
        probe_until = now + PROBE_WINDOW_NS;
        atomic_store(&place_mode, 0);
    }
    if (atomic_load(&place_mode) == 0 && now - loads_since >= MOVE_NS) {
        remember_cpu_times();  /* for choosing a CPU: over up to MOVE_NS (ticks are 10 ms) */
        loads_since = now;
    }
    atomic_store(&window_start, now);
    atomic_store(&window_busy, 0);
}

static void
reset_placement(void)
{
    atomic_store(&place_mode, 0);
    atomic_store(&wait_ns, 0);
    atomic_store(&window_batches, 0);
    atomic_store(&window_overlaps, 0);
    atomic_store(&window_start, 0);
    probe_until = 0;
    probe_every = PROBE_NS;
}

static void
apply_mode(int mode)
{
    if (mode == 1) {
        int cpu = atomic_load(&place_cpu);
        cpu_set_t one;
        CPU_ZERO(&one);
        if (cpu >= 0)
            CPU_SET(cpu, &one);
        if (cpu < 0 || sched_setaffinity(0, sizeof one, &one) != 0)
            return;  /* a CPU we may not use: stay as we are */
        applied_cpu = cpu;
    } else {
        sched_setaffinity(0, sizeof spread_set, &spread_set);
    }
    applied = mode;
}

static void
hooked_invoke(struct ev_loop *loop)
{
    if (is_finalizing()) {
        invoke_pending(loop);  /* gevent's callbacks check it themselves and do nothing */
        return;
    }
    if (thread_auto) {
        int mode = atomic_load(&place_mode);
        if (mode != applied || (mode == 1 && atomic_load(&place_cpu) != applied_cpu))
            apply_mode(mode);
    }
    if (owe)
        wait_turn();
    long t0 = thread_auto ? now_ns() : 0;
    atomic_fetch_add(&hubs_waiting, 1);
    PyGILState_STATE s = PyGILState_Ensure();
    atomic_fetch_sub(&hubs_waiting, 1);
    atomic_fetch_add(&batches, 1);
    if (atomic_load(&futex_sleepers) > 0)
        syscall(SYS_futex, &batches, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    if (thread_auto) {
        long t1 = now_ns();
        atomic_fetch_add(&wait_ns, t1 - t0);
        atomic_fetch_add(&window_batches, 1);
        if (atomic_fetch_add(&in_batch, 1) > 0)
            atomic_fetch_add(&window_overlaps, 1);
        my_batches++;
        evaluate(t1);
    }
    invoke_pending(loop);
    if (my_batches > 0) {  /* counted above (thread_auto may have changed in the batch) */
        my_batches--;
        atomic_fetch_sub(&in_batch, 1);
    }
    if (thread_fair && atomic_load(&hubs_waiting) > 0) {
        owe = 1;
        owe_gen = atomic_load(&batches);
    }
    PyGILState_Release(s);
    if (thread_auto && applied == 1)
        sched_yield();  /* pinned: let the next hub on this CPU take its turn */
}

static int
find_libev(const char *path)
{
    if (set_invoke_pending_cb != NULL)
        return 1;
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (h == NULL)
        return 0;
    void *set = dlsym(h, "ev_set_invoke_pending_cb");
    void *inv = dlsym(h, "ev_invoke_pending");
    /* The handle stays open: the loaded module never goes away anyway. */
    if (set == NULL || inv == NULL)
        return 0;
    *(void **)&invoke_pending = inv;
    *(void **)&set_invoke_pending_cb = set;
    return 1;
}

PyDoc_STRVAR(hook_loop_doc,
"hook_loop(loop_ptr, libev_path, fair, auto) -> bool\n\n"
"Run every pending watcher of one iteration of the libev loop at loop_ptr under one GIL\n"
"acquisition (see the module comment), taking turns with other hooked hubs if fair; with auto,\n"
"the thread joins the placement chosen by measurement (pinned or spread).  Call it\n"
"in the loop's own thread, before the loop runs.  False if libev's entry points are not in\n"
"libev_path (nothing changed).");

static PyObject *
sp_hook_loop(PyObject *self, PyObject *args)
{
    unsigned long long ptr;
    const char *path;
    int fair, autoplace;
    if (!PyArg_ParseTuple(args, "Kspp", &ptr, &path, &fair, &autoplace))
        return NULL;
    if (ptr == 0 || !find_libev(path))
        Py_RETURN_FALSE;
    thread_fair = fair;
    trace_placement = getenv("QIOC_PLACEMENT_TRACE") != NULL;
    const char *high = getenv("QIOC_AUTO_HIGH");
    if (high != NULL && *high)
        HIGH = atof(high);
    if (autoplace && !thread_auto) {
        if (sched_getaffinity(0, sizeof spread_set, &spread_set) == 0) {
            thread_auto = 1;
            applied = 0;
            atomic_fetch_add(&auto_hubs, 1);
            if (atomic_load(&window_start) == 0)
                atomic_store(&window_start, now_ns());
        }
    }
    set_invoke_pending_cb((struct ev_loop *)(uintptr_t)ptr, hooked_invoke);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(unhook_loop_doc,
"unhook_loop(loop_ptr) -> None: give the loop back libev's own invoke-pending callback.");

static PyObject *
sp_unhook_loop(PyObject *self, PyObject *arg)
{
    unsigned long long ptr = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (ptr != 0 && set_invoke_pending_cb != NULL)
        set_invoke_pending_cb((struct ev_loop *)(uintptr_t)ptr, invoke_pending);
    owe = 0;
    if (thread_auto) {
        thread_auto = 0;
        if (applied)
            sched_setaffinity(0, sizeof spread_set, &spread_set);
        applied = 0;
        if (atomic_fetch_sub(&auto_hubs, 1) == 1)  /* the last auto hub: the next pool starts afresh */
            reset_placement();
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(gil_stats_doc,
"gil_stats() -> dict: batches, handoffs (fairness waits), handoff_timeouts, since import; the\n"
"auto placement: mode (\"pinned\" or \"spread\"), cpu, pins, spreads, contention (the last\n"
"window's GIL wait per second), auto_hubs; hubs_waiting (hooked hubs taking the GIL now).");

static PyObject *
sp_gil_stats(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("{s:k,s:k,s:k,s:s,s:i,s:k,s:k,s:k,s:d,s:d,s:i,s:i}", "batches",
                         (unsigned long)atomic_load(&batches), "handoffs", atomic_load(&handoffs),
                         "handoff_timeouts", atomic_load(&handoff_timeouts), "mode",
                         atomic_load(&place_mode) ? "pinned" : "spread", "cpu", atomic_load(&place_cpu),
                         "pins", atomic_load(&pins), "spreads", atomic_load(&spreads), "moves",
                         atomic_load(&moves),
                         "contention", last_contention, "overlap", last_overlap, "auto_hubs",
                         atomic_load(&auto_hubs), "hubs_waiting", atomic_load(&hubs_waiting));
}

static PyMethodDef methods[] = {
    {"recv", (PyCFunction)(void (*)(void))sp_recv, METH_FASTCALL, recv_doc},
    {"recv_into", (PyCFunction)(void (*)(void))sp_recv_into, METH_FASTCALL, recv_into_doc},
    {"send", (PyCFunction)(void (*)(void))sp_send, METH_FASTCALL, send_doc},
    {"recvmsg", (PyCFunction)(void (*)(void))sp_recvmsg, METH_FASTCALL, recvmsg_doc},
    {"sendmsg", (PyCFunction)(void (*)(void))sp_sendmsg, METH_FASTCALL, sendmsg_doc},
    {"hook_loop", sp_hook_loop, METH_VARARGS, hook_loop_doc},
    {"unhook_loop", sp_unhook_loop, METH_O, unhook_loop_doc},
    {"gil_stats", sp_gil_stats, METH_NOARGS, gil_stats_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "qioc_green._speedups",
    "The optional compiled hot path of qioc_green (see the comment at the top of _speedups.c).",
    -1, methods, NULL, NULL, NULL, NULL,
};

/* In a child of fork() only the forking thread lives on: the other hubs' shares of the
 * counters are gone with them.  A hub that was waiting for the GIL at the fork stayed counted
 * in hubs_waiting, and every batch of a hub in the child then waited (2 ms, wait_turn) for it. */
static void
forked_child(void)
{
    atomic_store(&hubs_waiting, 0);
    atomic_store(&futex_sleepers, 0);
    atomic_store(&in_batch, thread_auto ? my_batches : 0);
    atomic_store(&auto_hubs, thread_auto ? 1 : 0);
    atomic_store(&window_busy, 0);
    ntasks = 0;
    if (!thread_auto)
        reset_placement();
}

PyMODINIT_FUNC
PyInit__speedups(void)
{
    static int at_fork;
    if (!at_fork) {
        if (pthread_atfork(NULL, NULL, forked_child) != 0) {
            PyErr_SetString(PyExc_ImportError, "qioc_green._speedups: pthread_atfork failed");
            return NULL;
        }
        at_fork = 1;
    }
    return PyModule_Create(&module);
}
