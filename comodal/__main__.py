"""``python -m comodal``: the ``comodal`` command line."""

import sys

from comodal.cli import main

sys.exit(main())
