"""`ray job submit --working-dir . -- python tune.py ...`: the options of `agepipe tune`."""

import sys

from agepipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
