"""`python -m igpt_fast ...`: the igpt-fast command, for environments whose scripts folder is not on PATH."""

import sys

from igpt_fast.cli import main

sys.exit(main())
