"""A fault-injection TCP proxy between the gateway and a device (simulated or real).

The proxy forwards one TCP port to another and, on a schedule or on command, makes the link
misbehave the way shop-floor networks do:

============  =======================================================================
``latency``   every frame in a direction waits ``seconds`` longer (order is kept)
``delay``     the next ``count`` frames in a direction wait ``seconds`` longer
``late``      the next ``count`` answers (device → client) arrive ``seconds`` late:
              after the client gave up, while it may already wait for the next answer
``drop``      the next ``count`` frames in a direction are discarded
``stall``     connections stay open, nothing is forwarded (a hung PLC); frames that
              arrive meanwhile are discarded, as a hung device never answers them
``cut``       every open connection is closed at once (both sides)
``refuse``    new connections are accepted and closed at once (device rebooting)
``exception`` Modbus only: every request is answered by the proxy with exception ``code``
              (default 4, server device failure) instead of reaching the device (a PLC
              in STOP, a gateway whose serial side is dead)
``heal``      all faults end, pending frame faults are forgotten
============  =======================================================================

Frames are protocol frames, not TCP segments: the proxy splits the byte stream with the
length fields of Modbus TCP (MBAP header) and OPC UA binary (message header), or passes
read chunks through as they come (``raw``), so "drop one frame" drops one request or
answer exactly.

The module has a pure core (plan models, the timeline of a plan, frame splitting and the
:class:`FaultState` that decides what happens to each frame given the time) and a thin
asyncio shell (:class:`FaultProxy`). Time comes into the core as float seconds.

A plan file (YAML or JSON)::

    repeat_every: 60          # optional: run the steps again every 60 s
    steps:
      - {at: 5, fault: latency, seconds: 0.2, duration: 10}
      - {at: 20, fault: stall, duration: 8}
      - {at: 30, fault: cut}
      - {at: 35, fault: drop, direction: down, count: 1}
      - {at: 40, fault: late, seconds: 2.5}
      - {at: 50, fault: exception, code: 4, duration: 5}
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = structlog.get_logger(__name__)

FaultKind = Literal[
    "latency", "delay", "late", "drop", "stall", "cut", "refuse", "exception", "heal"
]
#: ``up`` is client → device (requests), ``down`` is device → client (answers).
Direction = Literal["up", "down", "both"]
Framing = Literal["modbus", "opcua", "raw"]

#: Faults that last (they have an end); the others act once when they start.
WINDOW_FAULTS: frozenset[str] = frozenset({"latency", "stall", "refuse", "exception"})

#: Largest frame accepted before the stream is treated as raw bytes (OPC UA's default
#: receive buffer is 64 KiB; a Modbus TCP ADU is at most 260 bytes).
MAX_FRAME = 16 * 1024 * 1024


class PlanError(ValueError):
    """A fault plan or command is invalid; the message says what to fix."""


# ---------------------------------------------------------------------------- plan models


class FaultStep(BaseModel):
    """One fault: what, when (seconds after the proxy starts), how long, which way."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    fault: FaultKind
    #: How long a window fault lasts; unset means until ``heal`` (or forever).
    duration: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    #: Extra delay for ``latency``, ``delay`` and ``late``.
    seconds: float = Field(default=0.0, ge=0, le=3600, allow_inf_nan=False)
    #: Frames affected by ``drop``, ``delay`` and ``late``.
    count: int = Field(default=1, ge=1, le=1_000_000)
    direction: Direction = "both"
    #: Modbus exception code the ``exception`` fault answers with.
    code: int = Field(default=4, ge=1, le=127)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.fault in ("latency", "delay", "late") and self.seconds <= 0:
            raise ValueError(f"{self.fault} needs seconds > 0")
        if self.duration is not None and self.fault not in WINDOW_FAULTS:
            raise ValueError(
                f"{self.fault} acts once; only {', '.join(sorted(WINDOW_FAULTS))} take a duration"
            )
        if self.fault == "late" and self.direction == "up":
            raise ValueError("late delays answers (direction down); use delay for requests")
        return self


class FaultPlan(BaseModel):
    """A schedule of faults, optionally repeated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: tuple[FaultStep, ...] = ()
    #: Run the steps again every this many seconds (a step at ``at`` repeats at ``at + k*T``).
    repeat_every: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _fits(self) -> Self:
        if self.repeat_every is not None:
            for i, step in enumerate(self.steps):
                end = step.at + (step.duration or 0.0)
                if end > self.repeat_every:
                    raise ValueError(
                        f"steps[{i}] ends at {end:g} s, "
                        f"after repeat_every ({self.repeat_every:g} s)"
                    )
        return self


def parse_plan(data: Any) -> FaultPlan:
    """Validate a plan given as data (a mapping, or a bare list of steps)."""
    if isinstance(data, list):
        data = {"steps": data}
    try:
        return FaultPlan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(_describe(exc)) from None


def load_plan(path: str | Path) -> FaultPlan:
    """Read a YAML or JSON plan file; raise :class:`PlanError` naming the file and problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse_plan(data)
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from None


def parse_command(text: str) -> FaultStep:
    """One control command, ``stall 5`` style, as a step that starts now.

    Forms: ``latency SECONDS [DURATION] [up|down|both]``, ``delay SECONDS [COUNT] [dir]``,
    ``late SECONDS [COUNT]``, ``drop [COUNT] [dir]``, ``stall [DURATION]``, ``cut``,
    ``refuse [DURATION]``, ``exception [CODE] [DURATION]``, ``heal``.
    """
    words = text.split()
    if not words:
        raise PlanError("empty command")
    kind, rest = words[0].lower(), words[1:]
    direction: str = "both"
    if rest and rest[-1].lower() in ("up", "down", "both"):
        direction = rest.pop().lower()
    try:
        numbers = [float(w) for w in rest]
    except ValueError:
        raise PlanError(f"not a number in {text!r}") from None
    fields: dict[str, Any] = {"fault": kind, "direction": direction}
    names = {
        "latency": ("seconds", "duration"),
        "delay": ("seconds", "count"),
        "late": ("seconds", "count"),
        "drop": ("count",),
        "stall": ("duration",),
        "refuse": ("duration",),
        "exception": ("code", "duration"),
        "cut": (),
        "heal": (),
    }.get(kind)
    if names is None:
        raise PlanError(f"unknown fault {kind!r}; known: {', '.join(sorted(_KINDS))}")
    if len(numbers) > len(names):
        raise PlanError(f"{kind} takes at most {len(names)} number(s): {' '.join(names)}")
    for name, number in zip(names, numbers, strict=False):
        fields[name] = int(number) if name in ("count", "code") else number
    if kind == "late" and direction == "both":
        fields["direction"] = "down"
    try:
        return FaultStep.model_validate(fields)
    except ValidationError as exc:
        raise PlanError(_describe(exc)) from None


_KINDS = ("latency", "delay", "late", "drop", "stall", "cut", "refuse", "exception", "heal")


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


# ---------------------------------------------------------------------------- timeline


@dataclass(frozen=True, slots=True)
class Action:
    """A point on the timeline: a step starts (``start=True``) or a window ends."""

    at: float
    step: FaultStep
    start: bool = True


def timeline(plan: FaultPlan) -> Iterator[Action]:
    """Every start and end of the plan's faults in time order; endless when it repeats."""
    cycles = itertools.count() if plan.repeat_every is not None else range(1)
    period = plan.repeat_every or 0.0
    for cycle in cycles:
        base = cycle * period
        actions = []
        for step in plan.steps:
            actions.append(Action(base + step.at, step, True))
            if step.fault in WINDOW_FAULTS and step.duration is not None:
                actions.append(Action(base + step.at + step.duration, step, False))
        # Ends before starts at the same instant: back-to-back windows must not cancel.
        actions.sort(key=lambda a: (a.at, a.start))
        if not actions and plan.repeat_every is not None:
            return
        yield from actions


# ---------------------------------------------------------------------------- framing


def split_frames(buffer: bytes, framing: Framing) -> tuple[list[bytes], bytes]:
    """Split complete protocol frames off the front of ``buffer``; return them and the rest.

    ``raw`` returns the buffer as one frame. A header announcing an impossible length (not
    the protocol after all) also falls back to passing the bytes through unsplit.
    """
    if framing == "raw" or not buffer:
        return ([buffer] if buffer else []), b""
    frames: list[bytes] = []
    pos = 0
    while True:
        size = _frame_size(buffer, pos, framing)
        if size is None:
            break
        if size < 0:
            # Not a frame of this protocol: pass the rest through as it is.
            frames.append(buffer[pos:])
            return frames, b""
        if len(buffer) - pos < size:
            break
        frames.append(buffer[pos : pos + size])
        pos += size
    return frames, buffer[pos:]


def _frame_size(buffer: bytes, pos: int, framing: Framing) -> int | None:
    """Bytes of the frame at ``pos``; ``None`` if the header is incomplete, -1 if invalid."""
    if framing == "modbus":
        # MBAP: transaction id (2), protocol id (2), length (2) of what follows (unit + PDU).
        if len(buffer) - pos < 6:
            return None
        length = int.from_bytes(buffer[pos + 4 : pos + 6], "big")
        if length < 2 or length > 254:
            return -1
        return 6 + length
    # OPC UA binary (Part 6, 7.1.2): type (3), chunk type (1), message size (4, LE, total).
    if len(buffer) - pos < 8:
        return None
    size = int.from_bytes(buffer[pos + 4 : pos + 8], "little")
    if size < 8 or size > MAX_FRAME:
        return -1
    return size


def exception_reply(request: bytes, code: int) -> bytes | None:
    """The Modbus TCP exception response to ``request`` (same transaction, unit, function).

    ``None`` for a frame too short to be a request.
    """
    if len(request) < 8:
        return None
    function = request[7] & 0x7F
    return request[:4] + (3).to_bytes(2, "big") + request[6:7] + bytes((function | 0x80, code))


# ---------------------------------------------------------------------------- fault state


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one frame: drop it, or deliver it no earlier than ``deliver_at``."""

    drop: bool
    deliver_at: float
    reason: str = ""


@dataclass(slots=True)
class _Pending:
    kind: Literal["drop", "delay"]
    count: int
    seconds: float = 0.0


@dataclass(slots=True)
class FaultState:
    """Which faults are on; decides each frame's fate (pure: time comes in as an argument)."""

    latency: dict[str, float] = field(default_factory=lambda: {"up": 0.0, "down": 0.0})
    stalled: bool = False
    refusing: bool = False
    #: While set, Modbus requests are answered with this exception code by the proxy.
    excepting: int | None = None
    pending: dict[str, deque[_Pending]] = field(
        default_factory=lambda: {"up": deque(), "down": deque()}
    )
    #: Counters for reports and tests.
    forwarded: int = 0
    dropped: int = 0
    delayed: int = 0
    excepted: int = 0

    def apply(self, action: Action) -> bool:
        """Apply a timeline action; True when every open connection must be cut now."""
        step = action.step
        dirs = ("up", "down") if step.direction == "both" else (step.direction,)
        if step.fault == "heal":
            self.latency = {"up": 0.0, "down": 0.0}
            self.stalled = self.refusing = False
            self.excepting = None
            self.pending = {"up": deque(), "down": deque()}
            return False
        if step.fault == "cut":
            return True
        if step.fault == "latency":
            for d in dirs:
                self.latency[d] = step.seconds if action.start else 0.0
        elif step.fault == "stall":
            self.stalled = action.start
        elif step.fault == "refuse":
            self.refusing = action.start
        elif step.fault == "exception":
            self.excepting = step.code if action.start else None
        elif step.fault == "drop":
            for d in dirs:
                self.pending[d].append(_Pending("drop", step.count))
        elif step.fault in ("delay", "late"):
            for d in dirs:
                self.pending[d].append(_Pending("delay", step.count, step.seconds))
        return False

    def decide(self, direction: Literal["up", "down"], now: float) -> Verdict:
        """The fate of one frame that arrived at ``now`` travelling ``direction``."""
        if self.stalled:
            self.dropped += 1
            return Verdict(True, now, "stall")
        extra = self.latency[direction]
        queue = self.pending[direction]
        reason = "latency" if extra else ""
        if queue:
            head = queue[0]
            head.count -= 1
            if head.count <= 0:
                queue.popleft()
            if head.kind == "drop":
                self.dropped += 1
                return Verdict(True, now, "drop")
            extra += head.seconds
            reason = "delay"
            self.delayed += 1
        self.forwarded += 1
        return Verdict(False, now + extra, reason)


# ---------------------------------------------------------------------------- the shell


@dataclass(slots=True)
class ProxyStats:
    """Counters of one proxy, for logs, tests and the soak report."""

    connections: int = 0
    refused: int = 0
    cuts: int = 0


class _Link:
    """One client connection and its upstream connection, with one pump per direction."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        device: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.device = device
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self.tasks = [
                    tg.create_task(self._pump(self.client[0], self.device[1], "up")),
                    tg.create_task(self._pump(self.device[0], self.client[1], "down")),
                ]
        except* (ConnectionError, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for _, writer in (self.client, self.device):
            with contextlib.suppress(Exception):
                writer.transport.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Literal["up", "down"],
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(queue, writer))
        buffer = b""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                frames, buffer = split_frames(buffer + chunk, self.proxy.framing)
                for frame in frames:
                    now = loop.time()
                    if direction == "up":
                        self.proxy.request_times.append(now)
                        if self._answer_with_exception(frame):
                            continue
                    verdict = self.proxy.state.decide(direction, now)
                    if verdict.reason and verdict.reason != "latency":
                        log.debug(
                            "faultproxy.frame",
                            proxy=self.proxy.name,
                            direction=direction,
                            action=verdict.reason,
                            bytes=len(frame),
                        )
                    if not verdict.drop:
                        queue.put_nowait((verdict.deliver_at, frame))
            queue.put_nowait(None)
            await deliver
        finally:
            deliver.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await deliver

    def _answer_with_exception(self, frame: bytes) -> bool:
        """Answer a request here with the ``exception`` fault's code; False: not now."""
        code = self.proxy.state.excepting
        if code is None or self.proxy.framing != "modbus" or self.proxy.state.stalled:
            return False
        reply = exception_reply(frame, code)
        if reply is None:
            return False
        self.proxy.state.excepted += 1
        self.client[1].write(reply)
        return True

    async def _deliver(
        self, queue: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await queue.get()
            if item is None:
                # The sender closed its side: pass the half-close on, as TCP would.
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            # Frames keep their order: one delayed frame holds back the ones behind it,
            # exactly as a slow TCP path would.
            deliver_at, frame = item
            wait = deliver_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(frame)
            await writer.drain()


class FaultProxy:
    """Forward ``listen`` to ``target`` and inject faults on a plan or on command.

    Use as an async context manager; ``port`` is the bound port (pass ``listen_port=0`` for
    a free one). ``inject(step)`` applies a fault now; the plan runs from ``__aenter__``.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        plan: FaultPlan | None = None,
        framing: Framing = "raw",
        name: str | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        """Prepare; nothing listens until ``async with``."""
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self.plan = plan or FaultPlan()
        self.framing: Framing = framing
        self._name = name
        self.name = name or f"{listen_host}:{listen_port}->{target_host}:{target_port}"
        self.state = FaultState()
        self.stats = ProxyStats()
        self._connect_timeout = connect_timeout
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self.port = listen_port
        #: ``loop.time()`` of the latest client frames (requests), stalled ones included:
        #: how the device would see the client's poll schedule.
        self.request_times: deque[float] = deque(maxlen=100_000)

    @property
    def links(self) -> int:
        """Client connections open right now."""
        return len(self._links)

    async def __aenter__(self) -> Self:
        """Start listening and run the plan."""
        self._server = await asyncio.start_server(self._accept, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        if self._name is None:
            self.name = f"{self.listen[0]}:{self.port}->{self.target[0]}:{self.target[1]}"
        self._scheduler = asyncio.create_task(self._run_plan(), name=f"faultproxy[{self.name}]")
        log.info("faultproxy.listening", proxy=self.name, framing=self.framing)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop listening and close every connection."""
        await self.close()

    async def close(self) -> None:
        """Stop the plan, the listener and every connection."""
        if self._scheduler is not None:
            self._scheduler.cancel()
        if self._server is not None:
            self._server.close()
        self.cut(log_it=False)
        tasks = list(self._tasks)
        if self._scheduler is not None:
            tasks.append(self._scheduler)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def inject(self, step: FaultStep) -> None:
        """Apply a fault now; a window fault with a duration ends by itself."""
        loop = asyncio.get_running_loop()
        self._do(Action(0.0, step, True))
        if step.fault in WINDOW_FAULTS and step.duration is not None:
            loop.call_later(step.duration, self._do, Action(0.0, step, False))

    def cut(self, *, log_it: bool = True) -> None:
        """Close every open connection now (both sides)."""
        if log_it and self._links:
            self.stats.cuts += 1
        for link in list(self._links):
            link.close()

    def _do(self, action: Action) -> None:
        step = action.step
        log.info(
            "faultproxy.fault_started" if action.start else "faultproxy.fault_ended",
            proxy=self.name,
            fault=step.fault,
            direction=step.direction,
            seconds=step.seconds or None,
            duration=step.duration,
            count=step.count if step.fault in ("drop", "delay", "late") else None,
        )
        if self.state.apply(action):
            self.cut()

    async def _run_plan(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for action in timeline(self.plan):
            wait = started + action.at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._do(action)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.state.refusing:
                self.stats.refused += 1
                writer.transport.abort()
                return
            try:
                async with asyncio.timeout(self._connect_timeout):
                    device = await asyncio.open_connection(*self.target)
            except (OSError, TimeoutError) as exc:
                log.warning("faultproxy.target_unreachable", proxy=self.name, error=str(exc))
                writer.transport.abort()
                return
            self.stats.connections += 1
            link = _Link(self, (reader, writer), device)
            self._links.add(link)
            try:
                await link.run()
            finally:
                self._links.discard(link)
        finally:
            self._tasks.discard(task)


def stall_plan(
    after: float, duration: float | None = None, repeat_every: float | None = None
) -> FaultPlan:
    """A plan with one stall: ``after`` seconds in, lasting ``duration`` (forever if unset)."""
    return parse_plan(
        {
            "repeat_every": repeat_every,
            "steps": [{"at": after, "fault": "stall", "duration": duration}],
        }
    )


def merge_plans(plans: Sequence[FaultPlan]) -> FaultPlan:
    """One plan with the steps of several non-repeating plans."""
    if any(p.repeat_every is not None for p in plans):
        raise PlanError("repeating plans cannot be merged")
    return FaultPlan(steps=tuple(s for p in plans for s in p.steps))
