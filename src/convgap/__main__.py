"""``python -m convgap``: the command line (:mod:`convgap.cli`)."""

import sys

from .cli import main

sys.exit(main())
