"""`ray job submit --working-dir . -- python score.py ...`: the options of `agepipe score`."""

import sys

from agepipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
