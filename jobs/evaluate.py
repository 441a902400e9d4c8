"""`ray job submit --working-dir . -- python evaluate.py ...`: the options of `agepipe evaluate`."""

import sys

from agepipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
