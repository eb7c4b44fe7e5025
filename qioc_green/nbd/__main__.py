"""``python -m qioc_green.nbd server ...`` (``qioc-nbd-server``) and ``python -m qioc_green.nbd
copy ...`` (``qioc-nbd-copy``)."""

import sys

from .cli import copy_main, server_main

USAGE = "usage: python -m qioc_green.nbd {server,copy} [options] (see --help of each)"


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("server", "copy"):
        print(USAGE, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    run = server_main if argv[0] == "server" else copy_main
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
