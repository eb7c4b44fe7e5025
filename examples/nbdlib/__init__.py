"""nbdlib: the NBD protocol for qioc_green's examples.

``nbdlib.protocol`` is sans-IO (bytes in, events out); the programs in ``examples/`` drive it over
channels. Everything public is re-exported here.
"""

from .protocol import *
from .protocol import __all__ as __all__
