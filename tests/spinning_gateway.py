"""``shopfloor run`` with a history sink that spins on the event loop, for the stall guard's tests.

The runner's batch loop is replaced by one that never awaits (the shape of a real bug this
gateway once had): the loop stops turning as soon as the runner starts. Everything else is
the real daemon, so the tests see what the loop watch and the signal handling do about it.

    python -m tests.spinning_gateway run -c CONFIG
"""

from __future__ import annotations

import sys
from typing import Any

from gateway.cli import main as cli
from gateway.delivery.sink import SinkRunner


async def _spin(self: SinkRunner[Any], room: int) -> list[Any]:
    while True:  # the bug under test: a loop that never awaits
        if self._queue.take() is not None:
            self._queue.requeue()


if __name__ == "__main__":
    SinkRunner._next_batch = _spin  # type: ignore[method-assign]
    sys.exit(cli.main(sys.argv[1:]))
