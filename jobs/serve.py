"""`ray job submit --working-dir . -- python serve.py ...`: the options of `agepipe serve`."""

import sys

from agepipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
