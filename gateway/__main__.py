"""``python -m gateway`` is the ``shopfloor`` command."""

import sys

from gateway.cli.main import main

sys.exit(main())
