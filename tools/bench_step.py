#!/usr/bin/env python
"""Step benchmark: flow matching vs naive and selective MeanFlow, sampling and loader throughput.

Thin wrapper so the benchmark runs from a checkout (`make bench`); the code lives in
`emf_lightning.commands.bench` (also `emf bench`). `python tools/bench_step.py --help` lists the options.
"""

import sys

from emf_lightning.commands.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
