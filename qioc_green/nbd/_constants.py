"""NBD's numbers: magics, limits, option/reply/command enums, and the wire structs.

From ``doc/proto.md`` of NetworkBlockDevice/nbd. The ``CMD_*``, ``FLAG_*``, ``T_*`` plain ints
repeat some enums for the hot paths (an enum attribute lookup costs more than a global).
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and every option
CLISERV_MAGIC = 0x00420281861253  # oldstyle greeting (not supported)
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71  # extended headers (not supported)

MAX_PAYLOAD = 32 * 1024 * 1024  # every server must take 2^25 byte payloads
MAX_STRING = 4096  # names, descriptions, messages
MAX_OPTION_LENGTH = 64 * 1024  # our bound on one option (or option reply) held in memory
MAX_EXTENTS = 1 << 20  # servers SHOULD NOT send more per block status chunk
BASE_ALLOCATION = "base:allocation"


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9
    ERR_EXT_HEADER_REQD = (1 << 31) + 10


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(IntFlag):
    DONE = 1 << 0


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Errno(IntEnum):
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class StateFlag(IntFlag):
    """Extent flags of the ``base:allocation`` metadata context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


# Plain ints for the hot paths (enum attribute lookups cost more than a global).
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16
REPLY_DONE = 1
T_NONE, T_DATA, T_HOLE, T_STATUS = 0, 1, 2, 5
T_ERROR, T_ERROR_OFFSET = (1 << 15) + 1, (1 << 15) + 2
REP_ERR_BIT = 1 << 31
CHUNK_ERR_BIT = 1 << 15

REQUEST_HEADER = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_HEADER = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
GREETING_HEADER = struct.Struct(">QQH")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
EXTENT = struct.Struct(">II")
ZEROES = bytes(124)
REQUEST_SIZE = REQUEST_HEADER.size  # 28
SIMPLE_SIZE = SIMPLE_HEADER.size  # 16
CHUNK_SIZE = CHUNK_HEADER.size  # 20
# The largest non-data chunk the client holds in memory: a block status chunk of 2^20 extents.
MAX_CHUNK = 4 + 8 * MAX_EXTENTS

# Which command flags each command accepts (FUA is accepted everywhere once SEND_FUA is
# advertised; the spec says existing clients set it on any command).
CMD_FLAGS = {
    CMD_READ: FLAG_FUA | FLAG_DF,
    CMD_WRITE: FLAG_FUA,
    CMD_DISC: FLAG_FUA,
    CMD_FLUSH: FLAG_FUA,
    CMD_TRIM: FLAG_FUA,
    CMD_CACHE: FLAG_FUA,
    CMD_WRITE_ZEROES: FLAG_FUA | FLAG_NO_HOLE | FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: FLAG_FUA | FLAG_REQ_ONE,
}


def name_of(enum: type[IntEnum], value: int) -> str:
    try:
        return enum(value).name
    except ValueError:
        return str(value)

