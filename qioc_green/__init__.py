"""qioc_green: QEMU's QIOChannel for gevent.

Blocking-style I/O channels for greenlets, where every OS thread runs its own gevent hub as its
AioContext, and a channel that must wait parks the calling greenlet on the hub of the thread it
runs in (QEMU 8.2, "io: follow coroutine AioContext in qio_channel_yield()").
"""

from ._context import Context, Future, context_of, current_context, iohandler_context, main_context
from ._native import SPEEDUPS, hot_path
from .address import SocketAddress, parse_address
from .channel import Channel, ChannelStatistics, Feature, IOCondition, ReadFlag, Shutdown, WriteFlag
from .channel_buffer import BufferChannel, NullChannel
from .channel_command import CommandChannel
from .channel_file import FileChannel
from .channel_socket import SocketChannel
from .channel_tls import TLSChannel
from .channel_watch import Watch
from .errors import (
    BrokenChannelError,
    ChannelBusyError,
    ChannelClosedError,
    ChannelError,
    ChannelTimeoutError,
    ContextStoppedError,
    NotSupportedError,
    UnexpectedEOF,
    WouldBlock,
)
from .net_listener import NetListener
from .sync import Event, Lock, Queue, QueueClosed, QueueEmpty, QueueFull
from .task import Task, run_in_thread
from .threads import IOThread, IOThreadPool

__version__ = "0.1.0"

__all__ = [
    "BrokenChannelError",
    "BufferChannel",
    "Channel",
    "ChannelBusyError",
    "ChannelClosedError",
    "ChannelError",
    "ChannelStatistics",
    "ChannelTimeoutError",
    "CommandChannel",
    "Context",
    "ContextStoppedError",
    "Event",
    "Feature",
    "FileChannel",
    "Future",
    "IOCondition",
    "IOThread",
    "IOThreadPool",
    "Lock",
    "NetListener",
    "NotSupportedError",
    "NullChannel",
    "Queue",
    "QueueClosed",
    "QueueEmpty",
    "QueueFull",
    "ReadFlag",
    "SPEEDUPS",
    "Shutdown",
    "SocketAddress",
    "SocketChannel",
    "TLSChannel",
    "Task",
    "UnexpectedEOF",
    "Watch",
    "WouldBlock",
    "WriteFlag",
    "context_of",
    "current_context",
    "hot_path",
    "iohandler_context",
    "main_context",
    "parse_address",
    "run_in_thread",
]
