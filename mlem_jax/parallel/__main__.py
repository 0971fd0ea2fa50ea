"""`python -m mlem_jax.parallel COMMAND ...`: one process of a multi-process run, supervised
so that an end by JAX's coordination service is one line (`mlem_jax.parallel._supervisor`)."""

import sys

from mlem_jax.parallel._supervisor import main

sys.exit(main())
