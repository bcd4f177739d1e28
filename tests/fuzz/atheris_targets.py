"""Coverage-guided fuzzing with atheris (``make fuzz`` only; atheris is not a dependency).

    python -m tests.fuzz.atheris_targets --seconds 60 [--target commands|modbus|watch]

Each target runs for its share of the time; a crash stops the run with the input that caused
it (add it to ``test_regressions.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import sys
from collections.abc import Callable

ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
TYPES = (
    "bool",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "uint64",
    "int64",
    "float32",
    "float64",
    "bcd16",
    "bcd32",
    "string",
)


def commands(data: bytes) -> None:
    """decode_command: a command or a CommandError, nothing else."""
    from gateway.contract.models import CommandError, decode_command

    name = "assign-order" if data[:1] < b"\x80" else "cancel-order"
    try:
        decode_command(name, data[1:])
    except CommandError:
        pass
    except RecursionError:
        pass  # known finding, pinned in test_regressions.py


def modbus(data: bytes) -> None:
    """decode: a value or a DecodeError for any registers."""
    import atheris

    from shopfloor_gateway.adapters.base import DecodeError
    from shopfloor_gateway.adapters.modbus.config import ModbusSignalConfig
    from shopfloor_gateway.adapters.modbus.decode import decode

    fdp = atheris.FuzzedDataProvider(data)
    kind = TYPES[fdp.ConsumeIntInRange(0, len(TYPES) - 1)]
    fields: dict[str, object] = {"address": 0, "type": kind}
    fields["word_order"] = ORDERS[fdp.ConsumeIntInRange(0, 3)]
    if kind == "string":
        fields["length"] = fdp.ConsumeIntInRange(1, 125)
    sig = ModbusSignalConfig.model_validate(fields)
    registers = [fdp.ConsumeIntInRange(0, 0xFFFF) for _ in range(fdp.ConsumeIntInRange(0, 130))]
    with contextlib.suppress(DecodeError):
        decode(registers, sig)


def watch(data: bytes) -> None:
    """FloorView.apply: never an internal error for any payload."""
    from gateway.cli.watch import FloorView

    view = FloorView("sf")
    topic = "sf/s/a/l/m/" + ("state" if data[:1] < b"\x80" else "event/order.progress")
    view.apply(topic, data[1:], False)
    bad = [p for p in view.problems if "internal error" in p and "RecursionError" not in p]
    if bad:
        raise AssertionError(bad)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "commands": commands,
    "modbus": modbus,
    "watch": watch,
}


def _run(name: str, seconds: int) -> None:
    import atheris
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))
    with atheris.instrument_imports():
        import shopfloor_gateway.adapters.modbus.decode  # noqa: F401
    seed = [f"-max_total_time={seconds}", "-rss_limit_mb=2048", "-print_final_stats=1"]
    atheris.Setup([sys.argv[0], *seed], TARGETS[name])
    atheris.Fuzz()


def main() -> int:
    """Run every target (or one) for its share of ``--seconds``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--target", choices=sorted(TARGETS))
    args = parser.parse_args()
    names = [args.target] if args.target else list(TARGETS)
    share = max(1, args.seconds // len(names))
    failed = []
    for name in names:
        # Each target in its own process: atheris.Fuzz() ends the process when done.
        proc = multiprocessing.Process(target=_run, args=(name, share))
        proc.start()
        proc.join()
        print(json.dumps({"target": name, "exit": proc.exitcode}))
        if proc.exitcode:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
