"""`python -m scanformer_jax ...` is the `scanformer` console script."""

import sys

from scanformer_jax.cli import main

sys.exit(main())
