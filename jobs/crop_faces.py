"""`ray job submit --working-dir . -- python crop_faces.py ...`: the options of `agepipe crop`."""

import sys

from agepipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["crop", *sys.argv[1:]]))
