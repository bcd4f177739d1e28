"""The chaos checker judges recorded traffic correctly (no broker: recorded messages given)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from tests.chaos.campaign import OWN_IDS
from tests.chaos.checker import Checker, Message

PREFIX = "chaos/plant-x/sewing/line-1"


class FakeRecorder:
    """What the checker reads from a recorder: the messages so far."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def snapshot(self) -> list[Message]:
        return list(self.messages)

    def add(self, topic: str, doc: dict[str, Any]) -> None:
        self.messages.append(Message(time.time(), topic, json.dumps(doc).encode(), False))


def event(
    machine: str,
    seq: int,
    *,
    eid: str | None = None,
    kind: str = "machine.state.changed",
    **data: Any,
) -> dict[str, Any]:
    return {
        "id": eid or f"{machine}-{seq}",
        "type": f"io.shopfloor.{kind}",
        "subject": machine,
        "sequence": seq,
        "data": data,
    }


def make() -> tuple[Checker, FakeRecorder, FakeRecorder]:
    acme, zeta = FakeRecorder(), FakeRecorder()
    checker = Checker(
        {"acme": acme, "zeta": zeta},  # type: ignore[dict-item]
        own_ids=OWN_IDS,
        device_machines=["sew-01"],
    )
    return checker, acme, zeta


def invariants(checker: Checker) -> list[str]:
    return [v.invariant for v in checker.violations]


def test_a_hole_is_one_violation_per_run_and_the_union_of_platforms_counts() -> None:
    checker, acme, zeta = make()
    for s in (1, 2, 6):
        acme.add(f"{PREFIX}/box-01/event/x", event("box-01", s))
    zeta.add(f"{PREFIX}/box-01/event/x", event("box-01", 3))
    assert checker.holes() == {"box-01": [4, 5]}
    checker.check(1, {})
    assert invariants(checker) == ["no_loss"]
    assert checker.violations[0].evidence["missing"] == [4, 5]
    assert checker.holes() == {}  # reported holes are not waited for again
    checker.check(2, {})
    assert len(checker.violations) == 1


def test_a_snapshot_sequence_reveals_a_lost_tail() -> None:
    checker, acme, _ = make()
    acme.add(f"{PREFIX}/box-01/event/x", event("box-01", 1))
    acme.add(f"{PREFIX}/box-01/state", {"machine": "box-01", "sequence": 3})
    assert checker.holes() == {"box-01": [2, 3]}


def test_duplicates_must_match_except_delayed_and_sequences_are_used_once() -> None:
    checker, acme, _ = make()
    acme.add(f"{PREFIX}/sew-01/event/x", event("sew-01", 1, state="running"))
    acme.add(f"{PREFIX}/sew-01/event/x", {**event("sew-01", 1, state="running"), "delayed": True})
    checker.check(1, {})
    assert checker.violations == []
    acme.add(f"{PREFIX}/sew-01/event/x", event("sew-01", 1, state="idle"))
    acme.add(f"{PREFIX}/sew-01/event/x", event("sew-01", 1, eid="other", state="idle"))
    checker.check(2, {})
    assert sorted(invariants(checker)) == ["duplicates", "sequence_once"]


def test_a_restart_of_the_numbering_is_fine_when_the_epoch_changed() -> None:
    checker, acme, _ = make()
    acme.add(f"{PREFIX}/sew-01/event/x", event("sew-01", 1))
    acme.add(f"{PREFIX}/sew-01/event/x", {**event("sew-01", 1, eid="again"), "epoch": 2})
    checker.check(1, {})
    assert checker.violations == []


def test_counts_never_above_the_station_and_exact_on_target() -> None:
    checker, acme, _ = make()
    truth = {"sew-01": {"PO-1": (10, 1, 10, True), "PO-2": (5, 0, 20, False)}}
    acme.add(
        f"{PREFIX}/sew-01/event/x",
        event("sew-01", 1, kind="order.progress", order_id="PO-2", good=5, scrap=0),
    )
    acme.add(
        f"{PREFIX}/sew-01/event/x",
        event(
            "sew-01",
            2,
            kind="order.completed",
            order_id="PO-1",
            good=10,
            scrap=1,
            reason="target_reached",
        ),
    )
    checker.check(1, truth)
    assert checker.violations == []
    acme.add(
        f"{PREFIX}/sew-01/event/x",
        event("sew-01", 3, kind="order.progress", order_id="PO-2", good=6, scrap=0),
    )
    checker.check(2, truth)
    assert invariants(checker) == ["counts"]


def test_scope_leaks_neutral_refusals_and_squatted_command_ids() -> None:
    checker, acme, zeta = make()
    checker.note_sent("acme", "box-01", "assign-order", {"command_id": "a-1", "order_id": "ACME-1"})
    # zeta asks about acme's order: the echo of its own question is no leak, a neutral
    # refusal is fine.
    checker.note_sent("zeta", "box-01", "cancel-order", {"command_id": "z-1", "order_id": "ACME-1"})
    answer = {"command_id": "z-1", "command": "cancel-order", "machine": "box-01"}
    zeta.add(
        f"{PREFIX}/box-01/cmd/cancel-order/response",
        {**answer, "order_id": "ACME-1", "accepted": False, "reason": "unknown order 'ACME-1'"},
    )
    checker.check(1, {})
    assert checker.violations == []
    # A refusal that says what the order does is a leak; so is an event naming it.
    checker.note_sent("zeta", "box-01", "assign-order", {"command_id": "z-2", "order_id": "ACME-1"})
    zeta.add(
        f"{PREFIX}/box-01/cmd/assign-order/response",
        {
            "command_id": "z-2",
            "command": "assign-order",
            "machine": "box-01",
            "order_id": "ACME-1",
            "accepted": False,
            "reason": "order ACME-1 is already running",
        },
    )
    zeta.add(f"{PREFIX}/box-01/state", {"machine": "box-01", "order": {"order_id": "ACME-1"}})
    checker.check(2, {})
    assert [v.what.split(" ")[1] for v in checker.violations] == ["assign", "received"]
    # zeta used acme's next command id first: acme's first answer is a duplicate.
    checker.note_sent("zeta", "box-02", "assign-order", {"command_id": "a-2", "order_id": "ZETA-9"})
    checker.sent[-1].t -= 1.0  # strictly before acme's command
    checker.note_sent("acme", "box-02", "assign-order", {"command_id": "a-2", "order_id": "ACME-2"})
    acme.add(
        f"{PREFIX}/box-02/cmd/assign-order/response",
        {
            "command_id": "a-2",
            "command": "assign-order",
            "machine": "box-02",
            "order_id": "ACME-2",
            "accepted": True,
            "reason": "duplicate command: started",
        },
    )
    checker.check(3, {})
    assert any("taken as a duplicate" in v.what for v in checker.violations)


def test_process_checks() -> None:
    checker, _, _ = make()
    checker.check_memory(1, 100 * 1024, 256 * 1024, "")
    checker.check_stop(1, 2.0, 15.0, "")
    assert checker.violations == []
    checker.check_memory(2, 300 * 1024, 256 * 1024, "big_commands")
    checker.check_stop(2, None, 15.0, "tail")
    checker.check_exit(2, 1, "tail")
    assert invariants(checker) == ["memory", "shutdown", "alive"]
    assert checker.summary()["memory"] == {"held": False, "violations": 1}


def test_a_progress_drop_is_tolerated_only_while_the_disk_was_full() -> None:
    checker, acme, _ = make()

    def progress(seq: int, at: str) -> dict[str, Any]:
        return {**event("box-01", seq, kind="order.progress", order_id="ACME-1"), "time": at}

    acme.add(f"{PREFIX}/box-01/event/x", progress(1, "2026-01-01T00:00:00.000Z"))
    acme.add(f"{PREFIX}/box-01/event/x", progress(3, "2026-01-01T00:00:10.000Z"))
    acme.add(f"{PREFIX}/box-01/event/x", progress(5, "2026-01-01T00:10:00.000Z"))
    start = datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC).timestamp()
    checker.note_disk_full(start, start + 2)
    checker.check(1, {})
    assert [t["sequences"] for t in checker.tolerated] == [[2, 2]]
    assert [v.evidence["missing"] for v in checker.violations] == [[4, 4]]
    assert checker.holes() == {}
