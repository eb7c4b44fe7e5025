"""Wire codecs for the pieces of NBD that are not state: request headers, block status
payloads, protocol strings, option data; and ``check_request``, the semantic checks a server
makes before serving a request (the state machines check the framing)."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ._constants import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLAGS,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EXTENT,
    FLAG_DF,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    MAX_PAYLOAD,
    MAX_STRING,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    U16,
    U32,
    Errno,
    Opt,
    TransmissionFlag,
)
from ._events import (
    Event,
    Extent,
    OptAbort,
    OptExportName,
    OptGo,
    OptInfo,
    OptInvalid,
    OptList,
    OptListMetaContext,
    OptSetMetaContext,
    OptStartTLS,
    OptStructuredReply,
    OptUnknown,
    Request,
)
from ._util import (
    LocalProtocolError,
    RemoteProtocolError,
)

# ---------------------------------------------------------------------------------------------
# Plain encode/decode helpers


def encode_request(request: Request) -> bytes:
    """The 28-byte request header (the WRITE payload, if any, is not included)."""
    return REQUEST_HEADER.pack(REQUEST_MAGIC, request.flags, request.command, request.cookie,
                         request.offset, request.length)


def decode_request_header(header: bytes | memoryview) -> Request:
    """Decode 28 header bytes; raises RemoteProtocolError for a wrong magic."""
    magic, flags, command, cookie, offset, length = REQUEST_HEADER.unpack_from(header)
    if magic != REQUEST_MAGIC:
        raise RemoteProtocolError(f"expected request magic 0x{REQUEST_MAGIC:08x}, got 0x{magic:08x}", 0)
    return Request(command, cookie, offset, length, flags)


def encode_extents(context_id: int, extents: Sequence[tuple[int, int]]) -> bytes:
    """The payload of a block status chunk."""
    flat: list[int] = []
    for length, flags in extents:
        flat.append(length)
        flat.append(flags)
    return struct.pack(f">I{len(flat)}I", context_id, *flat)


def decode_extents(payload: bytes | memoryview) -> tuple[int, tuple[Extent, ...]]:
    """(context id, extents) from a block status chunk payload (length 4 + 8n, n >= 1)."""
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise RemoteProtocolError(f"block status payload of {len(payload)} bytes is not 4 + 8n, n >= 1")
    (context_id,) = U32.unpack_from(payload)
    extents = tuple(Extent(length, flags) for length, flags in EXTENT.iter_unpack(payload[4:]))
    return context_id, extents


def decode_string(data: bytes | memoryview, what: str) -> str:
    """Decode a protocol string; ValueError (with a reason) if it breaks the rules."""
    if len(data) > MAX_STRING:
        raise ValueError(f"{what} of {len(data)} bytes is over {MAX_STRING}")
    raw = bytes(data)
    if b"\0" in raw:
        raise ValueError(f"{what} contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8") from None


def encode_string(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING or b"\0" in raw:
        raise LocalProtocolError(f"{what} must be at most {MAX_STRING} bytes of UTF-8 without NUL")
    return raw


def decode_option(option: int, data: bytes) -> Event:
    """An option's data into its event; malformed data of a known option gives OptInvalid."""
    try:
        if option == Opt.EXPORT_NAME:
            return OptExportName(decode_string(data, "export name"))
        if option == Opt.ABORT:
            return OptAbort()  # the spec: ignore any data
        if option in (Opt.LIST, Opt.STARTTLS, Opt.STRUCTURED_REPLY):
            if data:
                raise ValueError(f"{len(data)} bytes of data where none are allowed")
            return {Opt.LIST: OptList, Opt.STARTTLS: OptStartTLS,
                    Opt.STRUCTURED_REPLY: OptStructuredReply}[Opt(option)]()
        if option in (Opt.INFO, Opt.GO):
            if len(data) < 6:
                raise ValueError(f"{len(data)} bytes, at least 6 needed")
            (name_len,) = U32.unpack_from(data)
            if name_len > len(data) - 6:
                raise ValueError(f"name length {name_len} exceeds the option's {len(data)} bytes")
            name = decode_string(data[4:4 + name_len], "export name")
            (count,) = U16.unpack_from(data, 4 + name_len)
            if len(data) != 6 + name_len + 2 * count:
                raise ValueError(f"{count} information requests do not fill {len(data)} bytes")
            requests = struct.unpack_from(f">{count}H", data, 6 + name_len)
            cls = OptInfo if option == Opt.INFO else OptGo
            return cls(name, requests)
        if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            if len(data) < 8:
                raise ValueError(f"{len(data)} bytes, at least 8 needed")
            (name_len,) = U32.unpack_from(data)
            if name_len > len(data) - 8:
                raise ValueError(f"name length {name_len} exceeds the option's {len(data)} bytes")
            name = decode_string(data[4:4 + name_len], "export name")
            pos = 4 + name_len
            (count,) = U32.unpack_from(data, pos)
            pos += 4
            if count * 4 > len(data) - pos:
                raise ValueError(f"{count} queries cannot fit in {len(data) - pos} bytes")
            queries = []
            for _ in range(count):
                if pos + 4 > len(data):
                    raise ValueError("query length runs past the option data")
                (qlen,) = U32.unpack_from(data, pos)
                pos += 4
                if qlen > len(data) - pos:
                    raise ValueError(f"query length {qlen} runs past the option data")
                queries.append(decode_string(data[pos:pos + qlen], "query"))
                pos += qlen
            if pos != len(data):
                raise ValueError(f"{len(data) - pos} trailing bytes after the queries")
            cls2 = OptListMetaContext if option == Opt.LIST_META_CONTEXT else OptSetMetaContext
            return cls2(name, tuple(queries))
    except ValueError as exc:
        return OptInvalid(option, data, str(exc))
    return OptUnknown(option, data)


def encode_option(event: Event) -> tuple[int, bytes]:
    if isinstance(event, OptExportName):
        return Opt.EXPORT_NAME, encode_string(event.name, "export name")
    if isinstance(event, OptAbort):
        return Opt.ABORT, b""
    if isinstance(event, OptList):
        return Opt.LIST, b""
    if isinstance(event, OptStartTLS):
        return Opt.STARTTLS, b""
    if isinstance(event, OptStructuredReply):
        return Opt.STRUCTURED_REPLY, b""
    if isinstance(event, (OptInfo, OptGo)):
        name = encode_string(event.name, "export name")
        reqs = tuple(event.requests)
        data = U32.pack(len(name)) + name + struct.pack(f">H{len(reqs)}H", len(reqs), *reqs)
        return (Opt.INFO if isinstance(event, OptInfo) else Opt.GO), data
    if isinstance(event, (OptListMetaContext, OptSetMetaContext)):
        name = encode_string(event.name, "export name")
        parts = [U32.pack(len(name)), name, U32.pack(len(event.queries))]
        for query in event.queries:
            raw = encode_string(query, "query")
            parts += [U32.pack(len(raw)), raw]
        opt = Opt.LIST_META_CONTEXT if isinstance(event, OptListMetaContext) else Opt.SET_META_CONTEXT
        return opt, b"".join(parts)
    if isinstance(event, OptUnknown):
        return event.option, bytes(event.data)
    raise LocalProtocolError(f"{event!r} is not an option")


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


# ---------------------------------------------------------------------------------------------
# Request checks for the server glue


def check_request(request: Request, *, export_size: int, transmission_flags: int,
                  minimum_block: int = 1, max_payload: int = MAX_PAYLOAD,
                  structured: bool = False, meta_contexts: int = 0) -> int:
    """The NBD errno a server should answer ``request`` with, or 0 if it may be served.

    Semantic checks only (the state machine already checked the framing), in the spec's order
    of preference: unknown command or flag and commands not advertised (EINVAL), writes to a
    read-only export (EPERM), misalignment (EINVAL), a READ or WRITE over the maximum payload
    (EINVAL), a range past the end (ENOSPC for writes, EINVAL otherwise). DISC is never checked.
    """
    cmd, flags, offset, length = request.command, request.flags, request.offset, request.length
    allowed = CMD_FLAGS.get(cmd)
    if allowed is None:
        return Errno.EINVAL
    if cmd == CMD_DISC:
        return 0
    if flags & ~allowed:
        return Errno.EINVAL
    tf = transmission_flags
    if flags & FLAG_FUA and not tf & TransmissionFlag.SEND_FUA:
        return Errno.EINVAL
    if flags & FLAG_DF and not (structured and tf & TransmissionFlag.SEND_DF):
        return Errno.EINVAL
    if flags & FLAG_FAST_ZERO and not tf & TransmissionFlag.SEND_FAST_ZERO:
        return Errno.EINVAL
    if cmd == CMD_FLUSH:
        if not tf & TransmissionFlag.SEND_FLUSH or offset or length:
            return Errno.EINVAL
        return 0
    if cmd == CMD_TRIM and not tf & TransmissionFlag.SEND_TRIM:
        return Errno.EINVAL
    if cmd == CMD_WRITE_ZEROES and not tf & TransmissionFlag.SEND_WRITE_ZEROES:
        return Errno.EINVAL
    if cmd == CMD_BLOCK_STATUS and not (structured and meta_contexts):
        return Errno.EINVAL
    if cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and tf & TransmissionFlag.READ_ONLY:
        return Errno.EPERM
    if minimum_block > 1 and (offset % minimum_block or length % minimum_block):
        return Errno.EINVAL
    if cmd in (CMD_READ, CMD_WRITE) and length > max_payload:
        return Errno.EINVAL
    if offset > export_size or length > export_size - offset:
        return Errno.ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else Errno.EINVAL
    return 0

