"""`python -m deltatune ...` is the `deltatune` command."""

import sys

from deltatune.cli import main

sys.exit(main())
