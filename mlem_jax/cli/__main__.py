"""`python -m mlem_jax.cli`: the `mlem-jax` command."""

import sys

from mlem_jax.cli import main

sys.exit(main())
