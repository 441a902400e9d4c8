"""`ray job submit --working-dir . -- python train.py ...`: the options of `agepipe train`."""

import sys

from agepipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
