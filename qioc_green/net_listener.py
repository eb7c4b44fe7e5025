"""NetListener: accept clients on several addresses and run a handler per client in a pool of
contexts.  QEMU: ``io/net-listener.c`` (QIONetListener).

How clients travel
------------------
* **One acceptor** (the default, as QEMU's listener watches from the main loop): a greenlet per
  listening socket in ``accept_context`` (the iohandler context unless told otherwise) accepts
  every client that is queued (``accept()`` tries before it parks), and starts the handler in a
  context chosen by the policy (round-robin over ``contexts`` by default).  Accepting therefore
  never depends on the thread that opened the listener running its hub.  The cost is one hop
  through the chosen context's inbox per *connection* (never per request: once started, the
  handler's channel follows its own context's hub).
* **One SO_REUSEPORT socket per context** (``reuse_port=True``): every handler context gets its
  own listening socket on the same TCP address, accepted in that very context, and the kernel
  spreads the connections (by a hash of the 4-tuple, so not evenly for a few connections).  No
  hop, no acceptor thread; UNIX and ``fd:`` addresses cannot share a port and keep the acceptor.

Acceptors start at the first ``set_client_handler()`` or ``wait_client()``; until then clients
wait in the kernel's backlog, as with QEMU, whose listener arms its watch with the callback.

The accept errno policy
-----------------------
``SocketChannel.accept`` already retries the errors that belong to one client (ECONNABORTED,
EPROTO).  What reaches us is a resource limit (EMFILE, ENFILE, ENOBUFS, ENOMEM) or something
stranger.  None of them is a reason to stop listening: the listener logs the first failure of a
streak once, sleeps (50 ms doubling up to 1 s: the clients already connected are what frees fds,
and they need the CPU), and retries; the next success logs the recovery.  This is what trio's
``SocketListener`` and Twisted do; a spinning acceptor would starve the handlers that free fds.

Lifetimes
---------
When a handler returns (or raises), the listener closes its channel.  A handler's exception is
logged with the peer's address and affects that connection only.  ``close(grace)`` stops
accepting at once, lets the running handlers finish for up to ``grace`` seconds, then closes
their channels (a handler parked on its channel resumes with ChannelClosedError, which is not
logged) and waits briefly for them to return.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

from . import _hub
from ._context import Context, Future, current_context, iohandler_context
from .address import parse_address
from .channel import Shutdown
from .channel_socket import SocketChannel
from .errors import BrokenChannelError, ChannelClosedError, ChannelError, ContextStoppedError, WouldBlock
from .threads import IOThread, IOThreadPool

_log = logging.getLogger("qioc_green.net_listener")

Handler = Callable[[SocketChannel], Any]
Contexts = Union[IOThreadPool, IOThread, "Context", Sequence[Union["Context", IOThread]], None]
Policy = Callable[[SocketChannel, Sequence["Context"]], "Context"]

_names = itertools.count(1)
_BACKOFF_START = 0.05
_BACKOFF_MAX = 1.0
_CLOSE_AFTER_GRACE = 2.0  # how long close() waits for handlers after closing their channels


def round_robin() -> Policy:
    """The default policy: each new client goes to the next context in turn."""
    counter = itertools.count()

    def pick(channel: SocketChannel, contexts: Sequence[Context]) -> Context:
        return contexts[next(counter) % len(contexts)]

    return pick


class _Client:
    __slots__ = ("channel", "context", "greenlet", "done")

    def __init__(self, channel: SocketChannel, context: Context) -> None:
        self.channel = channel
        self.context = context
        self.greenlet: Any = None
        self.done: Future[None] = Future()


class NetListener:
    """Listen on one or more addresses; hand each client, with follow on, to a handler greenlet.

    ``max_clients``: past that many clients being served, a new client is accepted and closed
    at once (it sees EOF) and counted in ``stats["refused"]``.  ``accept_context``: where the
    acceptor runs (default: the iohandler context).  ``reuse_port``: one SO_REUSEPORT socket per
    handler context instead of one acceptor (module docstring).  ``policy(channel, contexts)``
    picks the context of each new client (default: round-robin; ``"least-busy"`` picks the
    context serving the fewest clients).
    """

    def __init__(self, name: str | None = None, max_clients: int | None = None, *,
                 accept_context: Context | None = None, reuse_port: bool = False,
                 backlog: int = 1024) -> None:
        if max_clients is not None and max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self.name = name or f"listener-{next(_names)}"
        self.max_clients = max_clients
        self.reuse_port = reuse_port
        self.backlog = backlog
        self._accept_context = accept_context
        self._lock = _hub.OSLock()
        self._sockets: list[SocketChannel] = []
        self._started: set[int] = set()  # ids of listening channels that have an acceptor
        self._acceptors: list[Future[None]] = []
        self._handler: Handler | None = None
        self._contexts: list[Context] = []
        self._policy: Policy = round_robin()
        self._clients: set[_Client] = set()
        self._pending: list[SocketChannel] = []  # accepted with no handler: for wait_client()
        self._client_waiters: list[Future[SocketChannel]] = []
        self._closed = False
        self.accepted = 0
        self.refused = 0
        self.handler_errors = 0
        self.accept_errors = 0
        self.dispatch_errors = 0
        self._per_context: dict[str, int] = {}

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._sockets)} sockets, {len(self._clients)} clients"
        return f"<NetListener {self.name} {state}>"

    def __enter__(self) -> NetListener:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- opening ---------------------------------------------------------------------------------

    def open(self, addr: Any) -> list[str]:
        """Listen on ``addr`` (``tcp:HOST:PORT``, ``unix:PATH``, ``fd:N``); return the bound addresses.

        Repeatable.  Port 0 picks a free port; a host that resolves to IPv4 and IPv6 gives a
        socket for each (on the same port).  A UNIX path is unlinked on close.  Never switches
        (except to resolve a host name).  QEMU: ``qio_net_listener_open_sync()``.
        """
        if self._closed:
            raise ChannelClosedError(f"{self.name}: listener is closed")
        sa = parse_address(addr)
        reuse = self.reuse_port and sa.kind == "tcp"
        chans = SocketChannel.listen_all(sa, self.backlog, reuse_port=reuse)
        for ch in chans:
            ch.set_follow_coroutine_ctx(True)  # the acceptor waits on its own hub
        with self._lock:
            self._sockets.extend(chans)
            start = self._handler is not None or bool(self._client_waiters)
        if start:
            self._start_acceptors()
        return [ch.local_address for ch in chans]

    def add(self, channel: SocketChannel) -> None:
        """Listen on an already listening channel; the listener takes ownership.

        QEMU: ``qio_net_listener_add()``.
        """
        channel.set_follow_coroutine_ctx(True)
        with self._lock:
            self._sockets.append(channel)
            start = self._handler is not None or bool(self._client_waiters)
        if start:
            self._start_acceptors()

    @property
    def addresses(self) -> list[str]:
        """Every address listened on, in QEMU's spelling (the first socket of each reuse group)."""
        seen: list[str] = []
        for ch in list(self._sockets):
            if not ch.closed:
                a = ch.local_address
                if a not in seen:
                    seen.append(a)
        return seen

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: accepted, refused, active, handler_errors, accept_errors, dispatch_errors
        (clients closed because the policy, or handing them on, failed), per_context."""
        with self._lock:
            return {
                "accepted": self.accepted,
                "refused": self.refused,
                "active": len(self._clients),
                "handler_errors": self.handler_errors,
                "accept_errors": self.accept_errors,
                "dispatch_errors": self.dispatch_errors,
                "per_context": dict(self._per_context),
            }

    # -- handlers --------------------------------------------------------------------------------

    def set_client_handler(self, fn: Handler | None, contexts: Contexts = None, *,
                           policy: Policy | str | None = None) -> None:
        """Run ``fn(channel)`` as a greenlet for every accepted client (None: stop dispatching).

        ``contexts``: an IOThreadPool, one context or IOThread, or a list of them; None means
        the calling thread's context (TypeError at once for anything else).  The channel has follow on, so its waits park on the hub of
        the context the handler runs in.  When ``fn`` returns, the channel is closed.  Never
        switches.  QEMU: ``qio_net_listener_set_client_func_full()``.
        """
        ctxs = _contexts_list(contexts)
        if isinstance(policy, str):
            if policy != "least-busy":
                raise ValueError(f"unknown policy {policy!r} (a callable, or 'least-busy')")
            policy = self._least_busy
        with self._lock:
            if self._closed:
                raise ChannelClosedError(f"{self.name}: listener is closed")
            self._handler = fn
            self._contexts = ctxs
            if policy is not None:
                self._policy = policy
            pending, self._pending = self._pending, []
        for ch in pending:
            self._dispatch(ch, None, counted=True)
        if fn is not None:
            self._start_acceptors()

    def _least_busy(self, channel: SocketChannel, contexts: Sequence[Context]) -> Context:
        load = {id(c): 0 for c in contexts}
        for client in list(self._clients):
            if id(client.context) in load:
                load[id(client.context)] += 1
        return min(contexts, key=lambda c: load[id(c)])

    def wait_client(self, timeout: float | None = None) -> SocketChannel:
        """Wait for the next client and return its channel (follow on); the caller owns it.

        While a ``wait_client`` is pending, the next client goes to it rather than to the
        handler.  Parks the calling greenlet.  Raises TimeoutError when the time is up,
        ChannelClosedError if the listener is closed meanwhile.  Clients taken this way do not
        count towards ``max_clients``.  QEMU: ``qio_net_listener_wait_client()``.
        """
        fut: Future[SocketChannel] = Future()
        with self._lock:
            if self._closed:
                raise ChannelClosedError(f"{self.name}: listener is closed")
            if self._pending:
                return self._pending.pop(0)
            self._client_waiters.append(fut)
        self._start_acceptors()
        try:
            return fut.result(timeout)
        except BaseException as exc:
            # Whatever ends the wait (our timeout, gevent.Timeout, a kill, a stopping context),
            # the future leaves the line, or it would swallow the next client.
            with self._lock:
                if fut in self._client_waiters:
                    self._client_waiters.remove(fut)
                    if isinstance(exc, TimeoutError):
                        raise TimeoutError(f"{self.name}: no client within {timeout} s") from None
                    raise
            if not fut.done() or fut.exception(0) is not None:
                raise  # failed meanwhile (the listener closed): nothing to hand on
            if isinstance(exc, TimeoutError):
                return fut.result(0)  # a client arrived just as the time ran out
            # A client was handed to us as we were interrupted: pass it on, not lose it.
            self._dispatch(fut.result(0), None, counted=True)
            raise

    # -- accepting -------------------------------------------------------------------------------

    def _start_acceptors(self) -> None:
        with self._lock:
            if self._closed:
                return
            todo = [ch for ch in self._sockets if id(ch) not in self._started]
            self._started.update(id(ch) for ch in todo)
            contexts = list(self._contexts)
        default = self._accept_context or iohandler_context()
        for ch in todo:
            family_tcp = ch.local_address.startswith("tcp:")
            if self.reuse_port and family_tcp and len(contexts) > 0 and self._handler is not None:
                self._start_reuse_group(ch, contexts)
            else:
                self._acceptors.append(default.spawn(self._accept_loop, ch, None))

    def _start_reuse_group(self, first: SocketChannel, contexts: list[Context]) -> None:
        # One socket per context on the same address; the first one exists already.
        extra: list[SocketChannel] = []
        try:
            for _ in contexts[1:]:
                ch = SocketChannel.listen(first.local_address, self.backlog, reuse_port=True)
                ch.set_follow_coroutine_ctx(True)
                extra.append(ch)
        except BaseException:
            for ch in extra:
                ch.close()
            raise
        with self._lock:
            self._sockets.extend(extra)
            self._started.update(id(ch) for ch in extra)
        for ctx, ch in zip(contexts, [first, *extra]):
            self._acceptors.append(ctx.spawn(self._accept_loop, ch, ctx))

    def _accept_loop(self, lch: SocketChannel, own: Context | None) -> None:
        backoff = 0.0
        while True:
            try:
                ch = lch.accept()
            except (ChannelClosedError, ContextStoppedError):
                return
            except ChannelError as exc:
                if lch.closed or self._closed:
                    return
                with self._lock:
                    self.accept_errors += 1
                if not backoff:
                    _log.warning("%s: accept on %s failed (%s); backing off and retrying",
                                self.name, lch.local_address, exc.__cause__ or exc)
                backoff = min(backoff * 2, _BACKOFF_MAX) if backoff else _BACKOFF_START
                try:
                    _hub.sleep(backoff)
                except ContextStoppedError:
                    return
                continue
            if backoff:
                _log.warning("%s: accepting on %s again", self.name, lch.local_address)
                backoff = 0.0
            try:
                self._dispatch(ch, own)
            except Exception:  # a bug of ours or a caller's: log it, drop this client, go on
                with self._lock:
                    self.dispatch_errors += 1
                _log.exception("%s: dispatching client %s failed; closing it", self.name, _peer(ch))
                ch.close()

    def _dispatch(self, ch: SocketChannel, own: Context | None, counted: bool = False) -> None:
        """Give a new client to a wait_client() caller, or to the handler, or refuse it.

        ``counted``: a client held for wait_client() and handed on now, already in ``accepted``.
        """
        ch.set_follow_coroutine_ctx(True)
        with self._lock:
            if self._closed:
                refuse = True
            elif self._client_waiters:
                fut = self._client_waiters.pop(0)
                self.accepted += not counted
                fut.set_result(ch)
                return
            elif self._handler is None:
                self.accepted += not counted
                self._pending.append(ch)
                return
            else:
                refuse = self.max_clients is not None and len(self._clients) >= self.max_clients
            if refuse:
                self.refused += 1
                self.accepted -= counted
            else:
                try:
                    ctx = own if own is not None else self._pick(ch)
                except Exception:  # the user's policy: this client pays, the listener goes on
                    self.dispatch_errors += 1
                    self.accepted -= counted
                    _log.exception("%s: policy failed for client %s; closing it", self.name, _peer(ch))
                    ch.close()
                    return
                self.accepted += not counted
                client = _Client(ch, ctx)
                self._clients.add(client)
                self._per_context[ctx.name] = self._per_context.get(ctx.name, 0) + 1
                handler = self._handler
        if refuse:
            if not self._closed:
                _log.info("%s: refused %s: %d clients already", self.name, _peer(ch), self.max_clients)
            _close_refused(ch)
            return
        try:
            ctx.schedule(self._serve, client, handler)
        except ContextStoppedError:
            self._forget(client)
            ch.close()

    def _pick(self, ch: SocketChannel) -> Context:
        ctx = self._policy(ch, self._contexts)
        if not isinstance(ctx, Context):
            raise TypeError(f"the policy returned {ctx!r}, not a Context")
        return ctx

    def _serve(self, client: _Client, handler: Handler) -> None:
        # Runs in the client's context, inside its hub: start the handler greenlet from here
        # (one of the context's tasks, so stopping the context ends it).
        client.greenlet = _hub.spawn_here(self._run_handler, client, handler, tasks=client.context.tasks)

    def _run_handler(self, client: _Client, handler: Handler) -> None:
        ch = client.channel
        peer = ch.remote_address
        try:
            handler(ch)
        except (ChannelClosedError, ContextStoppedError):
            if not (ch.closed or self._closed or client.context.stopping):
                self._handler_failed(peer)
        except BrokenChannelError as exc:  # the peer's doing (reset, EOF mid-message): no traceback
            with self._lock:
                self.handler_errors += 1
            _log.warning("%s: client %s: %s", self.name, peer, exc)
        except Exception:
            self._handler_failed(peer)
        finally:
            ch.close()
            self._forget(client)

    def _handler_failed(self, peer: str) -> None:
        with self._lock:
            self.handler_errors += 1
        _log.exception("%s: handler for client %s failed", self.name, peer)

    def _forget(self, client: _Client) -> None:
        with self._lock:
            self._clients.discard(client)
        if not client.done.done():
            client.done.set_result(None)

    # -- closing ---------------------------------------------------------------------------------

    def close(self, grace: float = 5.0) -> None:
        """Stop accepting; let handlers finish within ``grace`` seconds; then close their channels.

        Handlers still running after the grace period resume with ChannelClosedError from
        whatever they are parked on.  A pending ``wait_client`` raises ChannelClosedError.
        Parks the caller for at most ``grace`` plus a short bounded wait.  Idempotent.
        QEMU: ``qio_net_listener_disconnect()`` plus waiting for the clients.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sockets, self._sockets = self._sockets, []
            pending, self._pending = self._pending, []
            waiters, self._client_waiters = self._client_waiters, []
            self._handler = None
        for ch in sockets:
            ch.close()
        for ch in pending:
            ch.close()
        for waiter in waiters:
            waiter.set_exception(ChannelClosedError(f"{self.name}: listener closed"))
        me = _hub.current_greenlet()
        deadline = time.monotonic() + max(grace, 0.0)
        self._wait_clients(deadline, me)
        with self._lock:
            left = [c for c in self._clients if c.greenlet is not me]
        for client in left:
            client.channel.close()
        self._wait_clients(time.monotonic() + _CLOSE_AFTER_GRACE, me)
        for acceptor in self._acceptors:
            try:
                acceptor.result(_CLOSE_AFTER_GRACE)
            except Exception:  # noqa: BLE001 - a stopped context ends its acceptor its own way
                pass

    def _wait_clients(self, deadline: float, me: Any) -> None:
        with self._lock:
            clients = [c for c in self._clients if c.greenlet is not me]
        for client in clients:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                client.done.result(remaining)
            except TimeoutError:
                return

    @property
    def closed(self) -> bool:
        return self._closed


def _contexts_list(contexts: Contexts) -> list[Context]:
    """What ``set_client_handler(contexts=)`` takes, as a list of contexts; TypeError at once for
    anything else (the acceptor would find out only at the first client)."""
    if contexts is None:
        return [current_context()]
    if isinstance(contexts, IOThreadPool):
        return contexts.contexts
    if isinstance(contexts, (Context, IOThread)):
        contexts = [contexts]
    if not isinstance(contexts, Iterable):
        raise TypeError(f"contexts must be a Context, an IOThread, an IOThreadPool or a list of them, "
                        f"not {type(contexts).__name__}")
    out = []
    for c in contexts:
        if isinstance(c, IOThread):
            c = c.context  # RuntimeError if it is not started
        if not isinstance(c, Context):
            raise TypeError(f"contexts must be Contexts or IOThreads, not {type(c).__name__}")
        out.append(c)
    if not out:
        raise ValueError("set_client_handler() needs at least one context")
    return out


def _peer(ch: SocketChannel) -> str:
    try:
        return ch.remote_address
    except Exception:  # noqa: BLE001 - only for a log line: a reset socket has no peer any more
        return "(unknown peer)"


_REFUSED_DRAIN = 4  # reads of 64 KiB at most, none of which waits


def _close_refused(ch: SocketChannel) -> None:
    """Close a refused client so that it sees EOF, not a reset.

    Closing a TCP socket with unread bytes queued makes the kernel answer with RST, so a client
    that spoke first (a request sent at once) would get ECONNRESET.  So: FIN first (after it the
    client reads EOF even if a reset follows), then read off what is queued, boundedly and
    without waiting, then close.  Never switches.
    """
    try:
        ch.shutdown(Shutdown.WRITE)
        ch.set_blocking(False)
        for _ in range(_REFUSED_DRAIN):
            if not ch.read(65536):
                break  # EOF: the client is gone already
    except (WouldBlock, ChannelError, OSError):
        pass  # nothing more queued, or the client reset first: close it either way
    ch.close()


__all__ = ["Contexts", "Handler", "NetListener", "Policy", "round_robin"]
