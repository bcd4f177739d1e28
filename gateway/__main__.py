"""``python -m gateway`` is the ``shopfloor`` command."""

import sys

from gateway.cli import main

sys.exit(main())
