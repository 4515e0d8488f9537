"""`python -m harness` is the tribench command."""

import sys

from harness.cli import main

sys.exit(main())
