"""`python -m nemo_upcycle.cli <command>` (what torchrun launches)."""

import sys

from nemo_upcycle.cli import main

sys.exit(main())
