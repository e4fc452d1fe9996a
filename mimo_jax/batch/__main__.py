"""`python -m mimo_jax.batch`: see `mimo_jax.batch.run`."""

import sys

from mimo_jax.batch.run import main

sys.exit(main())
