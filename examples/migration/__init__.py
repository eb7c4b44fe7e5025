"""QEMU live-migration stream: a sans-IO parser (``stream``) and summary fold (``summary``).

Those two touch no socket, file or clock, and are all this package exports. ``receiver`` is the
thin glue that drives them with qioc_green channels (used by ``examples/migration_receiver.py``),
and ``qemu`` starts QEMU processes and talks QMP for the demo, the tests and the benchmark; both
are imported by name, never from here, so importing the parser pulls in no I/O.
"""

from . import stream
from .stream import *  # noqa: F403 - the parser's public names, listed once in stream.__all__
from .summary import Summary

__all__ = [*stream.__all__, "Summary"]
