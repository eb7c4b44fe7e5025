#!/usr/bin/env python3
"""What ``make demo`` runs: the project's main job.

Runs the split-direction echo demo (reads in one IOThread, writes in another).  When the
migration receiver is present it becomes the demo instead.
"""

from __future__ import annotations

import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

if __name__ == "__main__":
    target = os.path.join(HERE, "migration_demo.py")
    if not os.path.exists(target):
        target = os.path.join(HERE, "split_echo_demo.py")
    sys.argv = [target] + sys.argv[1:]
    runpy.run_path(target, run_name="__main__")
