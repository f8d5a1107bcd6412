"""The `make demo` package: a memstore daemon, a baseline GPT and an Engram GPT, a report.

Runs as `python -m demo` (see `demo/__main__.py`) or `python -m demo.ablations`.
"""

import os

# Set before torch loads OpenMP (every entry point imports this package first): busy-waiting
# OpenMP workers collapse when the cores are shared with the memstore daemon or anything else.
# Measured on 2 busy cores: a 2-thread training step took 4.8 s spinning, 1.8 s passive.
# An OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
