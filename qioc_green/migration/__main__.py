"""``python -m qioc_green.migration``: the ``qioc-migration-receiver`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
