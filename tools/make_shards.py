#!/usr/bin/env python
"""Write WebDataset shards; the same as `emf shards ...` (see `python tools/make_shards.py --help`)."""

import sys

from emf_lightning.commands.shards import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
