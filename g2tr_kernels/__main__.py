"""`python -m g2tr_kernels ...` is the `g2tr` command."""
import sys

from .cli import main

sys.exit(main())
