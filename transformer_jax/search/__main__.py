"""`python -m transformer_jax.search embed|search ...` (see cli.py)."""
import sys

from transformer_jax.search.cli import main

sys.exit(main())
