"""The chaos campaign's independent checker: it listens like a platform and judges.

It imports nothing from ``gateway/`` or ``adapters/``: it knows the gateway only through the
MQTT contract (docs/contract.md), records every message on each platform's broker with
paho-mqtt directly, and compares what arrived with the truth it is given (the simulators'
own per-order counts, the commands each platform sent, the process measurements the
campaign took). Each invariant yields violations with evidence; the same violation is
reported once.

Invariants (names as in the report):

- ``no_loss``: per machine (and epoch), the sequences both platforms received together have
  no hole up to the newest sequence seen (events or retained snapshots). Only a superseded
  ``order.progress`` may be missing, and only after a full disk (the overflow policy).
- ``duplicates``: a repeated ``id`` carries the same content (``delayed`` aside).
- ``sequence_once``: one ``(machine, epoch, sequence)`` is never used by two ids; a
  restart of the numbering must come with a changed ``epoch``.
- ``counts``: device orders never show more pieces than the station made; an order completed
  with ``target_reached`` shows exactly the station's good and scrap counts.
- ``scope``: a platform never receives another platform's order ids (events, snapshots,
  answers), its refusals about others' orders are neutral (as for an order that does not
  exist), no answer gives queue positions, and an answer is always about the command that
  platform sent under that command id (never another platform's verdict).
- ``memory``: the gateway's RSS stays under the bound.
- ``shutdown``: after SIGTERM the process exits within its grace period.
- ``alive``: the process never exits unless asked to.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

INVARIANTS = (
    "no_loss",
    "duplicates",
    "sequence_once",
    "counts",
    "scope",
    "memory",
    "shutdown",
    "alive",
)

_STATE_REVEALING = re.compile(r"already|position|running|queued|\bran\b", re.IGNORECASE)
#: Bytes kept of a command payload (the recorder also sees the platforms' own commands).
_KEEP = 65536
_POSITION = re.compile(r"position\s+\d+", re.IGNORECASE)


@dataclass
class Message:
    """One message a recorder received."""

    t: float
    topic: str
    payload: bytes
    retain: bool


@dataclass
class Sent:
    """One command a platform published."""

    t: float
    platform: str
    machine: str
    command: str
    payload: dict[str, Any]


class Recorder:
    """A platform-like subscriber on one broker: persistent session, QoS 1, everything kept."""

    def __init__(self, name: str, host: str, port: int, prefix: str) -> None:
        """Prepare the paho client; ``start()`` connects."""
        self.name = name
        self.prefix = prefix
        self.messages: list[Message] = []
        self.connects = 0
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"chaos-recorder-{name}",
            clean_session=False,
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.1, 1.0)
        self._host = host
        self._port = port
        self.subscribed = threading.Event()
        #: Called on paho's thread with every decoded command answer.
        self.on_answer: Callable[[dict[str, Any]], None] | None = None

    def start(self) -> None:
        """Connect and start paho's network thread (reconnects by itself)."""
        self._client.connect(self._host, self._port, keepalive=5)
        self._client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError(f"recorder {self.name}: no SUBACK within 10 s")

    def stop(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.connects += 1
        if not getattr(flags, "session_present", False):
            # What a platform reads, not the commands: a hostile platform's 96 MiB commands
            # would otherwise reach the recorder too and take its network thread down.
            p = self.prefix
            client.subscribe(
                [
                    (f"{p}/+/+/+/+/event/#", 1),
                    (f"{p}/+/+/+/+/state", 1),
                    (f"{p}/+/+/+/+/telemetry", 1),
                    (f"{p}/+/+/+/+/cmd/+/response", 1),
                    (f"{p}/+/gateway/#", 1),
                ]
            )
        self.subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        if len(payload) > _KEEP and "/cmd/" in msg.topic and not msg.topic.endswith("/response"):
            # A huge command of the hostile platform: its size is the point, not its bytes.
            payload = payload[:_KEEP]
        with self._lock:
            self.messages.append(Message(time.time(), msg.topic, payload, msg.retain))
        hook = self.on_answer
        if hook is not None and msg.topic.endswith("/response"):
            try:
                answer = json.loads(msg.payload)
            except ValueError:
                return
            if isinstance(answer, dict):
                hook(answer)

    def snapshot(self) -> list[Message]:
        """The messages so far (a copy)."""
        with self._lock:
            return list(self.messages)


@dataclass
class Violation:
    """One broken invariant, with what shows it."""

    invariant: str
    what: str
    episode: int
    evidence: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """For the report."""
        return {
            "invariant": self.invariant,
            "what": self.what,
            "episode": self.episode,
            "evidence": self.evidence,
        }


def _strip_volatile(event: Mapping[str, Any]) -> dict[str, Any]:
    # The contract flags replays with "delayed": everything else must be the same.
    return {k: v for k, v in event.items() if k != "delayed"}


class Checker:
    """Records both platforms' traffic and checks the invariants after every episode."""

    def __init__(
        self,
        recorders: Mapping[str, Recorder],
        *,
        own_ids: Mapping[str, re.Pattern[str]],
        device_machines: Iterable[str],
    ) -> None:
        """``own_ids[platform]`` matches the order ids that platform may see."""
        self.recorders = dict(recorders)
        self.own_ids = dict(own_ids)
        self.device_machines = set(device_machines)
        self.sent: list[Sent] = []
        self.violations: list[Violation] = []
        self.tolerated: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._disk_full: list[tuple[float, float]] = []
        self.stats: dict[str, Any] = {}

    # -- inputs from the campaign ---------------------------------------------------------

    def note_sent(self, platform: str, machine: str, command: str, payload: dict[str, Any]) -> None:
        """A platform published a command (the checker's knowledge of who asked what)."""
        self.sent.append(Sent(time.time(), platform, machine, command, payload))

    def note_disk_full(self, start: float, end: float) -> None:
        """The disk was full from ``start`` to ``end`` (epoch seconds): the overflow policy
        may drop superseded progress made meanwhile."""
        self._disk_full.append((start, end))

    def flag(self, invariant: str, what: str, episode: int, key: str, **evidence: Any) -> None:
        """Record a violation once per ``key``."""
        if key in self._keys:
            return
        self._keys.add(key)
        self.violations.append(Violation(invariant, what, episode, evidence))

    # -- the events as received -------------------------------------------------------------

    def _events(self) -> list[tuple[str, Message, dict[str, Any]]]:
        out = []
        for name, rec in self.recorders.items():
            for m in rec.snapshot():
                if "/event/" not in m.topic or not m.payload:
                    continue
                try:
                    doc = json.loads(m.payload)
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    out.append((name, m, doc))
        return out

    def _snapshot_sequences(self) -> dict[str, int]:
        newest: dict[str, int] = {}
        for rec in self.recorders.values():
            for m in rec.snapshot():
                if not m.topic.endswith("/state") or not m.payload:
                    continue
                try:
                    doc = json.loads(m.payload)
                    machine, seq = str(doc["machine"]), int(doc["sequence"])
                except (ValueError, KeyError, TypeError):
                    continue
                newest[machine] = max(newest.get(machine, 0), seq)
        return newest

    def holes(self) -> dict[str, list[int]]:
        """Missing sequences per machine in its newest epoch (what settling waits for)."""
        _, by_key, latest_epoch = self._index()
        snap = self._snapshot_sequences()
        out: dict[str, list[int]] = {}
        for machine, epoch in latest_epoch.items():
            seqs = by_key[(machine, epoch)]
            top = max(max(seqs), snap.get(machine, 0)) if seqs else 0
            # Holes already reported will not fill any more: waiting for them is pointless.
            missing = [
                s
                for s in range(1, top + 1)
                if s not in seqs and f"hole:{machine}:{epoch}:{s}" not in self._keys
            ]
            if missing:
                out[machine] = missing
        return out

    def _index(
        self,
    ) -> tuple[
        dict[str, dict[str, Any]],
        dict[tuple[str, Any], dict[int, dict[str, Any]]],
        dict[str, Any],
    ]:
        by_id: dict[str, dict[str, Any]] = {}
        by_key: dict[tuple[str, Any], dict[int, dict[str, Any]]] = defaultdict(dict)
        latest_epoch: dict[str, Any] = {}
        for _, _, doc in self._events():
            eid, machine, seq = doc.get("id"), doc.get("subject"), doc.get("sequence")
            if not isinstance(eid, str) or not isinstance(machine, str) or not isinstance(seq, int):
                continue
            by_id.setdefault(eid, doc)
            epoch = doc.get("epoch")
            by_key[(machine, epoch)].setdefault(seq, doc)
            latest_epoch[machine] = epoch
        return by_id, by_key, latest_epoch

    # -- the checks ------------------------------------------------------------------------

    def check(
        self,
        episode: int,
        truth: Mapping[str, Mapping[str, tuple[int, int, int, bool]]],
        *,
        final: bool = False,
    ) -> list[Violation]:
        """Check every message invariant on everything received so far; returns new ones."""
        before = len(self.violations)
        self._check_events(episode)
        self._check_counts(episode, truth)
        self._check_scope(episode)
        return self.violations[before:]

    def _check_events(self, episode: int) -> None:
        first: dict[str, tuple[str, dict[str, Any]]] = {}
        by_key: dict[tuple[str, Any], dict[int, dict[str, Any]]] = defaultdict(dict)
        latest_epoch: dict[str, Any] = {}
        copies: dict[str, int] = defaultdict(int)
        first_per_platform: dict[str, dict[str, Any]] = {}
        reused: dict[tuple[str, Any], list[tuple[int, dict[str, Any], dict[str, Any]]]] = (
            defaultdict(list)
        )
        total = 0
        for platform, m, doc in self._events():
            total += 1
            eid, machine, seq = doc.get("id"), doc.get("subject"), doc.get("sequence")
            if not isinstance(eid, str) or not isinstance(machine, str) or not isinstance(seq, int):
                self.flag(
                    "duplicates",
                    "event without id, subject or integer sequence",
                    episode,
                    f"malformed:{m.payload[:200]!r}",
                    platform=platform,
                    topic=m.topic,
                )
                continue
            copies[f"{platform}:{eid}"] += 1
            # Each destination may redact differently (order ids of others, operator): a
            # copy is compared with what the same platform got first.
            seen = first_per_platform.setdefault(f"{platform}:{eid}", doc)
            if seen is not doc and _strip_volatile(seen) != _strip_volatile(doc):
                self.flag(
                    "duplicates",
                    "the same event id arrived with different content",
                    episode,
                    f"dupdiff:{platform}:{eid}",
                    id=eid,
                    first=seen,
                    again=doc,
                    platform=platform,
                )
            if eid in first:
                continue
            first[eid] = (platform, doc)
            epoch = doc.get("epoch")
            latest_epoch[machine] = epoch
            slot = by_key[(machine, epoch)]
            other = slot.get(seq)
            if other is None:
                slot[seq] = doc
            elif other.get("id") != eid:
                key = f"reuse:{machine}:{epoch}:{seq}"
                if key not in self._keys:
                    self._keys.add(key)
                    reused[(machine, epoch)].append((seq, other, doc))
        # One violation per machine and numbering, naming every sequence used twice.
        for (machine, epoch), hits in reused.items():
            seqs = [h[0] for h in hits]
            self.flag(
                "sequence_once",
                f"{machine}: {len(seqs)} sequence number(s) used by two events"
                + (" (epoch unchanged)" if epoch is None else f" in epoch {epoch}"),
                episode,
                f"reuses:{machine}:{epoch}:{min(seqs)}:{episode}",
                machine=machine,
                epoch=epoch,
                sequences=[[lo, hi] for lo, hi in _ranges(seqs)],
                first_reuse={
                    "sequence": hits[0][0],
                    "first": _brief(hits[0][1]),
                    "second": _brief(hits[0][2]),
                },
            )
        dup = sum(n - 1 for n in copies.values() if n > 1)
        self.stats.update(events_received=total, unique_events=len(first), duplicate_copies=dup)
        self.stats["max_copies_of_one_event"] = max(copies.values(), default=0)
        snap = self._snapshot_sequences()
        for (machine, epoch), slot in by_key.items():
            if not slot:
                continue
            top = max(slot)
            if epoch == latest_epoch.get(machine):
                top = max(top, snap.get(machine, 0))
            # Every numbering (the first, or a marked reset) starts at 1.
            missing = [s for s in range(1, top + 1) if s not in slot]
            for lo, hi in _ranges(missing):
                before, after = slot.get(lo - 1), slot.get(hi + 1)
                key = f"hole:{machine}:{epoch}:{lo}-{hi}"
                if self._droppable(before, after):
                    if key not in self._keys:
                        self._keys.add(key)
                        for s in range(lo, hi + 1):
                            self._keys.add(f"hole:{machine}:{epoch}:{s}")
                        self.tolerated.append(
                            {
                                "machine": machine,
                                "sequences": [lo, hi],
                                "why": "superseded progress dropped on a full disk "
                                "(overflow policy)",
                            }
                        )
                    continue
                # A hole seen before may have shrunk or grown since: report only news.
                fresh = [
                    s for s in range(lo, hi + 1) if f"hole:{machine}:{epoch}:{s}" not in self._keys
                ]
                for s in fresh:
                    self._keys.add(f"hole:{machine}:{epoch}:{s}")
                for flo, fhi in _ranges(fresh):
                    self.flag(
                        "no_loss",
                        f"{machine}: events with sequence {flo}..{fhi} never reached any platform"
                        if fhi > flo
                        else f"{machine}: event with sequence {flo} never reached any platform",
                        episode,
                        f"holerange:{machine}:{epoch}:{flo}-{fhi}",
                        machine=machine,
                        missing=[flo, fhi],
                        epoch=epoch,
                        newest_sequence=top,
                        before=_brief(before),
                        after=_brief(after),
                    )

    def _droppable(self, before: dict[str, Any] | None, after: dict[str, Any] | None) -> bool:
        if before is None or after is None:
            return False
        # The hole lies between its neighbours' times: a full disk must overlap that span.
        t0, t1 = _epoch_of(before) - 2.0, _epoch_of(after) + 2.0
        if not any(start <= t1 and end >= t0 for start, end in self._disk_full):
            return False

        def progress_of(doc: dict[str, Any]) -> Any:
            data = doc.get("data") if str(doc.get("type", "")).endswith("order.progress") else None
            return data.get("order_id") if isinstance(data, dict) else None

        # A dropped progress has a newer progress of the same order after it.
        return progress_of(after) is not None and progress_of(after) in (
            progress_of(before),
            (before.get("data") or {}).get("order_id"),
        )

    def _check_counts(
        self, episode: int, truth: Mapping[str, Mapping[str, tuple[int, int, int, bool]]]
    ) -> None:
        for _platform, _m, doc in self._events():
            machine = doc.get("subject")
            if machine not in self.device_machines:
                continue
            kind = str(doc.get("type", "")).removeprefix("io.shopfloor.")
            data = doc.get("data")
            if kind not in ("order.progress", "order.completed") or not isinstance(data, dict):
                continue
            order = data.get("order_id")
            real = truth.get(str(machine), {}).get(str(order))
            if real is None:
                self.flag(
                    "counts",
                    f"{machine}: order {order} was never produced on the station",
                    episode,
                    f"phantom:{machine}:{order}",
                    event=_brief(doc),
                )
                continue
            good, scrap, _target, _done = real
            seen_good, seen_scrap = data.get("good"), data.get("scrap")
            if (isinstance(seen_good, int) and seen_good > good) or (
                isinstance(seen_scrap, int) and seen_scrap > scrap
            ):
                self.flag(
                    "counts",
                    f"{machine}: order {order} shows more pieces than the station made",
                    episode,
                    f"over:{machine}:{order}",
                    event=_brief(doc),
                    station={"good": good, "scrap": scrap},
                )
            if (
                kind == "order.completed"
                and data.get("reason") == "target_reached"
                and (seen_good != good or seen_scrap != scrap)
            ):
                self.flag(
                    "counts",
                    f"{machine}: order {order} completed on target with counts that differ "
                    "from the station's",
                    episode,
                    f"exact:{machine}:{order}",
                    event=_brief(doc),
                    station={"good": good, "scrap": scrap},
                )

    def _check_scope(self, episode: int) -> None:
        sent_by: dict[tuple[str, str], list[Sent]] = defaultdict(list)
        for s in self.sent:
            cid = s.payload.get("command_id")
            if isinstance(cid, str):
                sent_by[(s.platform, cid)].append(s)
        # Who assigned an order id first, per machine (order ids are per machine).
        foreign_owner: dict[tuple[str, str], str] = {}
        for s in self.sent:
            oid = s.payload.get("order_id")
            if s.command == "assign-order" and isinstance(oid, str):
                foreign_owner.setdefault((s.machine, oid), s.platform)
        unknown_templates: set[str] = set()
        first_answer: dict[tuple[str, str], bool] = {}
        for platform, rec in self.recorders.items():
            others = [p for p in self.own_ids if p != platform]
            for m in rec.snapshot():
                if not m.payload:
                    continue
                text = m.payload.decode(errors="replace")
                if "/cmd/" in m.topic and not m.topic.endswith("/response"):
                    continue  # the platform's own command, as its broker carried it
                if m.topic.endswith("/response"):
                    self._check_answer(
                        episode,
                        platform,
                        m,
                        text,
                        others,
                        sent_by,
                        foreign_owner,
                        unknown_templates,
                        first_answer,
                    )
                    continue
                for other in others:
                    for found in self.own_ids[other].findall(text):
                        if self.own_ids[platform].fullmatch(found):
                            continue
                        self.flag(
                            "scope",
                            f"{platform} received an order id of {other}'s",
                            episode,
                            f"leak:{platform}:{found}:{m.topic.rsplit('/', 1)[-1]}",
                            topic=m.topic,
                            order_id=found,
                            payload=text[:600],
                        )

    def _check_answer(
        self,
        episode: int,
        platform: str,
        m: Message,
        text: str,
        others: list[str],
        sent_by: Mapping[tuple[str, str], list[Sent]],
        foreign_owner: Mapping[tuple[str, str], str],
        unknown_templates: set[str],
        first_answer: dict[tuple[str, str], bool],
    ) -> None:
        try:
            ans = json.loads(text)
        except ValueError:
            return
        if not isinstance(ans, dict):
            return
        cid, oid = ans.get("command_id"), ans.get("order_id")
        reason = str(ans.get("reason", ""))
        echoed = text.replace(str(oid), "") if isinstance(oid, str) else text
        for other in others:
            for found in self.own_ids[other].findall(echoed):
                if self.own_ids[platform].fullmatch(found):
                    continue
                self.flag(
                    "scope",
                    f"an answer to {platform} names an order of {other}'s it did not ask about",
                    episode,
                    f"answerleak:{platform}:{found}",
                    topic=m.topic,
                    answer=ans,
                )
        if _POSITION.search(reason):
            self.flag(
                "scope",
                f"an answer to the order-scoped platform {platform} gives a queue position",
                episode,
                f"position:{platform}",
                answer=ans,
            )
        if isinstance(cid, str):
            mine = sent_by.get((platform, cid), [])
            if not mine:
                self.flag(
                    "scope",
                    f"{platform} got an answer to command id {cid!r} it never sent",
                    episode,
                    f"strayanswer:{platform}:{cid}",
                    answer=ans,
                )
            elif not any(
                s.payload.get("order_id") == oid and s.command == ans.get("command") for s in mine
            ):
                self.flag(
                    "scope",
                    f"{platform} got another platform's verdict for command id {cid!r}",
                    episode,
                    f"foreignverdict:{platform}:{cid}",
                    answer=ans,
                    sent=[s.payload for s in mine],
                )
            key = (platform, cid)
            if key not in first_answer:
                first_answer[key] = True
                squatters = [
                    s
                    for other in others
                    for s in sent_by.get((other, cid), [])
                    if mine and s.t < mine[0].t
                ]
                first_of_mine = len(mine) <= 1 or m.t < mine[1].t
                if reason.startswith("duplicate command") and first_of_mine and squatters:
                    self.flag(
                        "scope",
                        f"{platform}'s first use of command id {cid!r} was taken as a duplicate "
                        f"of {squatters[0].platform}'s command",
                        episode,
                        f"squat:{platform}:{cid}",
                        answer=ans,
                        sent=mine[0].payload,
                        squatted_by=squatters[0].payload,
                    )
        if not isinstance(oid, str):
            return
        machine = str(ans.get("machine"))
        owner = foreign_owner.get((machine, oid))
        # Device orders belong to the platform whose order_ids pattern names them.
        is_foreign = (owner is not None and owner != platform) or (
            machine in self.device_machines
            and any(
                self.own_ids[o].fullmatch(oid) and not self.own_ids[platform].fullmatch(oid)
                for o in others
            )
        )
        command = ans.get("command")
        if not is_foreign:
            if command == "cancel-order" and reason == f"unknown order '{oid}'":
                unknown_templates.add("unknown order '<ID>'")
            return
        if command == "cancel-order":
            if reason.replace(oid, "<ID>") != "unknown order '<ID>'":
                self.flag(
                    "scope",
                    f"{platform}'s cancel of another platform's order {oid} was not refused "
                    "exactly as for an order that does not exist",
                    episode,
                    f"cancelleak:{platform}:{reason.replace(oid, '<ID>')}",
                    answer=ans,
                )
        elif command == "assign-order" and (
            ans.get("accepted") is True or _STATE_REVEALING.search(reason)
        ):
            self.flag(
                "scope",
                f"{platform}'s assign of another platform's order id {oid} was answered "
                "with something about that order",
                episode,
                f"assignleak:{platform}:{reason.replace(oid, '<ID>')}",
                answer=ans,
            )

    # -- process measurements --------------------------------------------------------------

    def check_memory(self, episode: int, peak_kib: int, limit_kib: int, context: str) -> None:
        """The RSS bound."""
        if peak_kib > limit_kib:
            self.flag(
                "memory",
                f"gateway RSS reached {peak_kib // 1024} MiB (bound {limit_kib // 1024} MiB)",
                episode,
                f"rss:{episode}",
                peak_mib=peak_kib // 1024,
                during=context,
            )

    def check_stop(self, episode: int, seconds: float | None, grace: float, log_tail: str) -> None:
        """The shutdown bound (``None``: did not exit, had to be killed)."""
        if seconds is None or seconds > grace:
            self.flag(
                "shutdown",
                "gateway did not exit within its grace period after SIGTERM"
                + ("" if seconds is None else f" (took {seconds:.1f} s)"),
                episode,
                f"stop:{episode}",
                grace_s=grace,
                took_s=seconds,
                log_tail=log_tail,
            )

    def check_exit(self, episode: int, rc: int, log_tail: str) -> None:
        """The process exited unasked."""
        self.flag(
            "alive",
            f"gateway exited by itself with status {rc}",
            episode,
            f"exit:{episode}:{rc}",
            returncode=rc,
            log_tail=log_tail,
        )

    def summary(self) -> dict[str, Any]:
        """Per invariant: held or the number of violations."""
        counts: dict[str, int] = defaultdict(int)
        for v in self.violations:
            counts[v.invariant] += 1
        return {
            name: {"held": counts[name] == 0, "violations": counts[name]} for name in INVARIANTS
        }


def _epoch_of(doc: Mapping[str, Any]) -> float:
    """The event's ``time`` as epoch seconds (NaN when unreadable)."""
    try:
        return datetime.fromisoformat(str(doc.get("time")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("nan")


def _ranges(values: list[int]) -> list[tuple[int, int]]:
    """Sorted integers as runs of consecutive values: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    out: list[tuple[int, int]] = []
    for v in sorted(values):
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def _brief(doc: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if doc is None:
        return None
    return {
        "id": doc.get("id"),
        "type": doc.get("type"),
        "sequence": doc.get("sequence"),
        "time": doc.get("time"),
        "data": doc.get("data"),
    }
