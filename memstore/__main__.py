"""`python -m memstore ...`: the same as the `memstore` console script."""
import sys

from memstore.cli import main

sys.exit(main())
