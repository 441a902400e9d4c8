"""`ray job submit --working-dir . -- python calibrate.py ...`: the options of `agepipe calibrate`."""

import sys

from agepipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
