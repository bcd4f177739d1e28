"""Order commands from platforms: the MQTT downlink and its responses.

A platform publishes ``assign-order`` or ``cancel-order`` to
``{prefix}/{site}/{area}/{line}/{machine}/cmd/{command}``. The listener

1. checks the topic names a machine of this gateway at that exact location,
2. refuses retained commands (a retained command would run again on every reconnect),
3. validates the payload (:func:`gateway.contract.models.decode_command`: size limit, JSON, fields),
4. hands the command to the machine's tracker through the runtime, which publishes the
   events it causes like any other,
5. answers every command it did not drop: on the MQTT 5 response topic with the correlation
   data when the command carried them, else on ``{command topic}/response``.

Commands come in on their own MQTT connection (client id ``{client_id}-cmd``), so a flood on
the downlink never sits in front of the event uplink. A token bucket bounds the work a flood
can cause: commands over the rate are counted and dropped without an answer, logged once per
flood with the count when it ends.

An MQTT 5 response topic chosen by the client is honoured only at or below the command's
own ``.../cmd/{command}/response`` topic: a command can never make the gateway publish a
fake event or state, nor publish anywhere else with the gateway's credentials.

Memory stays bounded whatever a publisher sends: the connection announces an MQTT 5 Maximum
Packet Size (the 16 KiB command limit plus room for topic and properties), so the broker
drops bigger messages before they are sent, and a Receive Maximum; the queue between the
connection and the handler holds at most :data:`INBOX_SIZE` messages and drops the rest
(counted, logged once per flood). MQTT 3.1.1 has no packet size limit: there the broker's
own limit (Mosquitto's ``max_packet_size``) must do it.

Every destination (platform broker) has its own listener, and a command is held to the
routing rules of the destination it came through: a platform can only address machines it
may see, can only assign orders for its own customers (a platform with exactly one customer
gets it filled in), and cannot cancel, or even learn of, another platform's orders.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.contract.envelope import Topics, format_time, parse_machine_topic
from gateway.contract.models import (
    MAX_COMMAND_BYTES,
    RESPONSE_SUFFIX,
    CommandError,
    decode_command,
    encode_response,
    error_response,
)
from gateway.core.backoff import Backoff
from gateway.core.model import Location
from gateway.core.routing import RouteRules, machine_visible, order_visible
from gateway.core.tracker import AssignOrder, CancelOrder, CommandResult
from gateway.delivery.mqtt.publisher import BrokerSettings, tls_context

#: The answer to a retained command (it would run again on every reconnect).
RETAINED = "retained commands are not accepted; publish commands with retain=false"
#: Seconds without a dropped command that end a flood episode.
FLOOD_QUIET = 1.0
#: Seconds without an inbox drop that end an inbox flood. Longer than ``FLOOD_QUIET``: the
#: broker hands a flood over in bursts, and on a busy host the handler empties the inbox
#: between two of them; one flood must still be one warning.
INBOX_QUIET = 5.0
#: Messages waiting between the MQTT connection and the handler; beyond it they are
#: dropped. At the packet limit below that is at most ~5 MiB, and a burst of 200
#: commands (the rate limit's burst) still fits.
INBOX_SIZE = 256
#: MQTT 5 Maximum Packet Size announced to the broker: the 16 KiB payload limit plus room
#: for the topic and properties, so an over-long command still gets its "exceeds" answer
#: while a 100 MB one never reaches the gateway.
MAX_PACKET_SIZE = MAX_COMMAND_BYTES + 4_096
#: Answers waiting for their PUBACK at once; beyond it an answer is dropped (counted).
MAX_REPLIES_IN_FLIGHT = 64
#: MQTT 5 Receive Maximum: QoS 1 commands the broker may have in flight to the gateway.
RECEIVE_MAXIMUM = 64
#: Longest text from a topic (machine, command name, topic) put in a log line or answer.
MAX_LOGGED_TEXT = 200
#: Reconnect waits of the command listener: at most 5 s once the broker is back. A down
#: listener loses commands (clean session), and it is one connection per destination.
LISTENER_BACKOFF = Backoff(base=0.5, cap=5.0, jitter=0.5)
#: A connection that held this long ends an outage: the next failure starts a new one.
STABLE_AFTER = 30.0
#: Connections lost soon after they were made before the listener warns of a flapping
#: session (once per outage).
FLAPS_TO_WARN = 3
#: A destination without routing rules sees everything.
_ALL = RouteRules()

log = structlog.get_logger(__name__)

Command = AssignOrder | CancelOrder


class CommandTarget(Protocol):
    """What the listener needs from the runtime."""

    def apply_command(self, machine: str, command: Command, now: float) -> CommandResult:
        """Run a command on a machine's tracker and publish the events it caused."""
        ...

    def customer_of(self, machine: str, order_id: str) -> str | None:
        """The customer an order on a machine was assigned for, if any."""
        ...


def scope(
    rules: RouteRules, machine: str, cmd: Command, target: CommandTarget
) -> tuple[Command | None, str]:
    """Hold a command to the routing rules of the destination it came through.

    Returns the command to run (an assignment may get its customer filled in) or ``None``
    with the reason to refuse it.
    """
    if not rules.order_scoped:
        return cmd, ""
    if isinstance(cmd, AssignOrder):
        if cmd.customer is None and len(rules.customers) == 1:
            return replace(cmd, customer=rules.customers[0]), ""
        if order_visible(rules, cmd.order_id, cmd.customer):
            return cmd, ""
        if cmd.customer is None:
            return None, (
                "name the customer of this order: this connection serves "
                + ", ".join(rules.customers or ("no customers",))
            )
        return None, f"customer {cmd.customer!r} is not served through this connection"
    customer = target.customer_of(machine, cmd.order_id)
    if order_visible(rules, cmd.order_id, customer):
        return cmd, ""
    # The same words as for an order that does not exist: another platform's order ids
    # must not leak through a refusal.
    return None, f"unknown order {cmd.order_id!r}"


@dataclass(frozen=True, slots=True)
class Reply:
    """What to publish in answer to one command."""

    topic: str
    payload: bytes
    correlation_data: bytes | None = None


@dataclass(slots=True)
class TokenBucket:
    """Rate limit with bursts (pure: time comes in with each call)."""

    rate: float
    burst: float
    tokens: float = -1.0
    last: float | None = None

    def take(self, now: float) -> bool:
        """True when one more command may run now."""
        if self.tokens < 0:
            self.tokens = self.burst
        if self.last is not None and now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def reply_topic(prefix: str, command_topic: str, requested: str | None) -> str:
    """Where the answer goes: the client's response topic when it is allowed, else the default.

    Allowed is the default topic (``{command topic}/response``) or a topic below it
    (``.../response/platform-7``), so every answer stays in the command's own response tree:
    the gateway never publishes elsewhere for whoever may publish a command.
    """
    default = command_topic + RESPONSE_SUFFIX
    if not requested:
        return default
    if any(c in requested for c in "+#\x00") or len(requested) > 512:
        return default
    if requested == default or requested.startswith(default + "/"):
        return requested
    return default


def clip(text: str, limit: int = MAX_LOGGED_TEXT) -> str:
    """Text from outside cut to ``limit`` characters for a log line or an answer."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def late_warning(cmd: Command, result: CommandResult, now: float) -> CommandResult:
    """An accepted assignment whose ``due`` has passed: say so in the answer's reason."""
    if not (isinstance(cmd, AssignOrder) and result.accepted and cmd.due is not None):
        return result
    if cmd.due >= now:
        return result
    return replace(
        result,
        reason=f"{result.reason}; due {format_time(cmd.due)} is already past: the order is late",
    )


def handle(
    *,
    prefix: str,
    machines: Mapping[str, Location],
    target: CommandTarget,
    rules: RouteRules = _ALL,
    destination: str = "",
    topic: str,
    payload: bytes,
    retained: bool,
    response_topic: str | None,
    correlation_data: bytes | None,
    now: float,
) -> Reply | None:
    """Process one downlink message; the reply to publish, or ``None`` for foreign topics."""
    parsed = parse_machine_topic(prefix, topic)
    if parsed is None or parsed.kind != "cmd" or parsed.name is None:
        return None
    # Topic segments come from the sender, of any length: clipped for logs and answers.
    command = clip(parsed.name, 64)
    machine = parsed.location.machine
    shown = clip(machine, 64)
    where = reply_topic(prefix, topic, response_topic)

    def reject(reason: str, command_id: str | None = None, order_id: str | None = None) -> Reply:
        log.warning(
            "command.rejected",
            machine=shown,
            command=command,
            command_id=command_id,
            order_id=order_id,
            reason=reason,
        )
        body = error_response(
            CommandError(reason, command_id=command_id, order_id=order_id),
            command=command,
            machine=shown,
            now=now,
        )
        return Reply(where, body, correlation_data)

    known = machines.get(machine) if machine_visible(rules, machine) else None
    if known is None or known != parsed.location:
        loc = parsed.location
        place = clip(f"{loc.area}/{loc.line}", 130)
        return reject(
            f"unknown machine {place}/{shown} on this gateway"
            if known is None
            else f"machine {machine} is at {known.area}/{known.line}, not {place}"
        )
    try:
        cmd = decode_command(command, payload)
    except CommandError as exc:
        if retained:
            # Never run, whatever it holds; the ids found help the platform match the answer.
            return reject(RETAINED, exc.command_id, exc.order_id)
        return reject(str(exc), exc.command_id, exc.order_id)
    if retained:
        return reject(RETAINED, cmd.command_id or None, cmd.order_id)
    scoped, why = scope(rules, machine, cmd, target)
    if scoped is None:
        return reject(why, cmd.command_id or None, cmd.order_id)
    # Command ids are the destination's own; a scoped destination's answers name no other
    # platform's orders.
    cmd = (
        replace(scoped, origin=destination, private=rules.order_scoped)
        if isinstance(scoped, AssignOrder)
        else replace(scoped, origin=destination)
    )
    result = late_warning(cmd, target.apply_command(machine, cmd, now), now)
    (log.info if result.accepted else log.warning)(
        "command.accepted" if result.accepted else "command.rejected",
        machine=machine,
        command=command,
        command_id=cmd.command_id or None,
        order_id=cmd.order_id,
        reason=result.reason,
    )
    body = encode_response(
        result,
        command=command,
        machine=machine,
        command_id=cmd.command_id or None,
        order_id=cmd.order_id,
        now=now,
    )
    return Reply(where, body, correlation_data)


def _cause(exc: BaseException) -> str:
    """What went wrong, with the underlying reason when aiomqtt wraps it.

    A lost connection shows only as "Disconnected during message iteration"; the reason
    (a broker's MQTT 5 DISCONNECT reason code, when it sends one) is in the cause.
    """
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return clip(text)


class _Inbox(asyncio.Queue[Any]):
    """The listener's bounded inbox: a message that finds it full is dropped and counted."""

    def __init__(self, maxsize: int, on_full: Callable[[], None]) -> None:
        super().__init__(maxsize)
        self._on_full = on_full

    def put_nowait(self, item: Any) -> None:
        """Queue ``item``, or drop it (no aiomqtt warning per message) when full."""
        if self.full():
            self._on_full()
            return
        super().put_nowait(item)


def _being_cancelled() -> bool:
    """True when the current task has a cancel pending (shutdown is under way)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class CommandListener:
    """Subscribes to the site's command topics and answers every command."""

    def __init__(
        self,
        settings: BrokerSettings,
        topics: Topics,
        machines: Mapping[str, Location],
        target: CommandTarget,
        *,
        rate: float = 50.0,
        burst: float = 200.0,
        clock: Callable[[], float] = time.time,
        backoff: Backoff | None = None,
        rules: RouteRules = _ALL,
        name: str = "default",
    ) -> None:
        self._s = settings
        self._topics = topics
        # The runtime's own mapping, not a copy: a config reload adds and removes machines.
        self._machines = machines
        self._target = target
        self._rules = rules
        self.name = name
        self._log = log.bind(destination=name)
        self._bucket = TokenBucket(rate, burst)
        self._clock = clock
        self._backoff = backoff or LISTENER_BACKOFF
        self._tls: ssl.SSLContext | None = (
            tls_context(settings.tls) if settings.tls is not None else None
        )
        self.handled = 0
        #: Commands over the rate limit, dropped without an answer.
        self.dropped = 0
        #: Messages dropped because the inbox was full (a flood faster than the handler).
        self.inbox_dropped = 0
        self._flood_dropped = 0
        self._last_drop = 0.0
        self._inbox_flood = False
        self._inbox: _Inbox | None = None
        self._last_inbox_drop = 0.0
        #: Set while a flood (rate limit or inbox) has not been declared over.
        self._flooding = asyncio.Event()
        #: Answers being published (each waits for its PUBACK in its own task).
        self._replies: set[asyncio.Task[None]] = set()
        #: Answers not sent because too many were waiting for the broker.
        self.replies_dropped = 0
        self._v5 = True
        self.subscribed = asyncio.Event()

    def _inbox_full(self) -> None:
        """A message found the inbox full: count it, warn once per flood."""
        self.inbox_dropped += 1
        self._last_inbox_drop = self._clock()
        if not self._inbox_flood:
            self._inbox_flood = True
            self._flooding.set()
            self._log.warning(
                "command.inbox_full", size=INBOX_SIZE, dropped_total=self.inbox_dropped
            )

    def _new_inbox(self, maxsize: int = INBOX_SIZE) -> _Inbox:
        self._inbox = _Inbox(maxsize, self._inbox_full)
        return self._inbox

    def _client(self) -> aiomqtt.Client:
        s = self._s
        connect: Properties | None = None
        if self._v5:
            # The broker drops what is bigger than this before sending it (MQTT 5 3.1.2.11.4),
            # so a 100 MB command never reaches memory here.
            connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect.MaximumPacketSize = MAX_PACKET_SIZE
            connect.ReceiveMaximum = RECEIVE_MAXIMUM
        return aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password_text,
            identifier=f"{s.client_id}-cmd",
            # MQTT 5 for response topics and correlation data; brokers that only speak
            # 3.1.1 get a 3.1.1 session and the default response topics.
            protocol=aiomqtt.ProtocolVersion.V5 if self._v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if self._v5 else True,
            keepalive=s.keepalive,
            timeout=s.connect_timeout,
            tls_context=self._tls,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            properties=connect,
            max_queued_incoming_messages=INBOX_SIZE,
            # aiomqtt builds its queue from a class; this one reports drops to the listener.
            queue_type=self._new_inbox,  # type: ignore[arg-type]
        )

    async def run(self) -> None:
        """Listen until cancelled; reconnects with backoff and never raises otherwise.

        Beside it a watch logs the end of a flood (with its count) once it has been quiet
        long enough, whether or not another command follows it.
        """
        watch = asyncio.create_task(self._watch_floods(), name=f"command-floods-{self.name}")
        try:
            await self._listen()
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _watch_floods(self) -> None:
        """End floods after their quiet spell: the count must not wait for a next command."""
        while True:
            await self._flooding.wait()
            # Checked a few times per quiet spell: the end is logged at most this late.
            await asyncio.sleep(FLOOD_QUIET / 4)
            if not self._end_floods(self._clock()):
                self._flooding.clear()

    def _end_floods(self, now: float) -> bool:
        """Log the end of each flood quiet long enough; True while one is still going on."""
        if (
            self._inbox_flood
            and now - self._last_inbox_drop >= INBOX_QUIET
            and self._inbox is not None
            and self._inbox.empty()
        ):
            self._inbox_flood = False
            self._log.info("command.inbox_recovered", dropped_total=self.inbox_dropped)
        if self._flood_dropped and now - self._last_drop >= FLOOD_QUIET:
            self._log.info("command.flood_ended", dropped=self._flood_dropped)
            self._flood_dropped = 0
        return self._inbox_flood or self._flood_dropped > 0

    async def _listen(self) -> None:
        """The connection loop of :meth:`run`.

        A failure is logged at warning once per cause and outage (``Not authorized`` after
        a password rotation, the broker gone), repeats at debug; connections that keep
        dropping soon after they were made (a client-id collision: Mosquitto closes a session
        taken over without a reason) get one warning that names the client id. An outage
        ends when a connection has held for :data:`STABLE_AFTER` seconds, so a flapping
        connection does not start a new one (and a new warning) each time.
        """
        attempt = 0
        down_since: float | None = None
        causes: set[str] = set()
        connected_at: float | None = None
        flaps = 0
        while True:
            try:
                async with self._client() as client:
                    options = self._options()
                    # paho takes the QoS from the options when there are options.
                    await client.subscribe(
                        self._topics.all_commands_filter(),
                        qos=1 if options is None else 0,
                        options=options,
                    )
                    self.subscribed.set()
                    connected_at = self._clock()
                    if down_since is not None:
                        self._log.info(
                            "command.listener_reconnected",
                            outage_s=round(self._clock() - down_since, 1),
                        )
                    down_since = None
                    try:
                        async for message in client.messages:
                            await self._on_message(client, message)
                            if _being_cancelled():
                                # Python 3.11's wait_for (inside aiomqtt) can swallow a
                                # cancel that coincides with a completion; honour it here.
                                raise asyncio.CancelledError
                    finally:
                        # Answers still waiting for this connection die with it.
                        for task in list(self._replies):
                            task.cancel()
            except asyncio.CancelledError:
                raise
            except aiomqtt.MqttError as exc:
                self.subscribed.clear()
                if _being_cancelled():
                    # aiomqtt turns a cancel that lands in its clean-up into an MqttError;
                    # reconnecting now would outlive the gateway's shutdown.
                    raise asyncio.CancelledError from exc
                text = _cause(exc)
                if self._v5 and "protocol" in text.lower():
                    self._v5 = False
                    self._log.info("command.listener_mqtt311", reason=text)
                    continue
                now = self._clock()
                if connected_at is not None and now - connected_at >= STABLE_AFTER:
                    # The last connection held: this failure starts a new outage.
                    attempt, causes, flaps = 0, set(), 0
                elif connected_at is not None:
                    flaps += 1
                    if flaps == FLAPS_TO_WARN:
                        # Mosquitto closes a session taken over without telling why; a
                        # connection that keeps dropping right after it was made is the sign.
                        self._log.warning(
                            "command.listener_unstable",
                            lost_soon_after_connect=flaps,
                            client_id=f"{self._s.client_id}-cmd",
                            hint="another client with this client id (a second gateway with "
                            "the same config?) may be taking the session over",
                        )
                connected_at = None
                if down_since is None:
                    down_since = now
                if text not in causes:
                    causes.add(text)
                    self._log.warning("command.listener_unreachable", error=text, attempts=attempt)
                else:
                    self._log.debug("command.listener_unreachable", error=text, attempts=attempt)
            except Exception:  # never let a bug here take the gateway down
                self.subscribed.clear()
                if _being_cancelled():
                    raise asyncio.CancelledError from None
                self._log.exception("command.listener_failed")
                connected_at = None
                if down_since is None:
                    down_since = self._clock()
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1

    def _options(self) -> Any:
        """MQTT 5 subscription options: keep the retain flag of live messages too.

        Without "retain as published" a broker clears the flag on a retained command that
        arrives while the gateway is subscribed, and it would run; with it, it is refused
        like one replayed at subscription. MQTT 3.1.1 has no such option (see the docs).
        """
        if not self._v5:
            return None
        return SubscribeOptions(qos=1, retainAsPublished=True)  # type: ignore[no-untyped-call]

    async def _on_message(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        now = self._clock()
        # A flood is over after a quiet spell (the inbox's: so one flood is one warning even
        # when the handler empties the inbox now and then), not with the first command the
        # refilling bucket lets through: one warning per flood, one line with the count at
        # its end. The watch (run()) ends it when no command follows.
        if not self._bucket.take(now):
            self.dropped += 1
            self._flood_dropped += 1
            self._last_drop = now
            if self._flood_dropped == 1:
                self._log.warning("command.flood", rate_per_s=self._bucket.rate)
                self._flooding.set()
            return
        self._end_floods(now)
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        props = getattr(message, "properties", None)
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        try:
            reply = handle(
                prefix=self._topics.prefix,
                machines=self._machines,
                target=self._target,
                rules=self._rules,
                destination=self.name,
                topic=str(message.topic),
                payload=bytes(payload),
                retained=bool(message.retain),
                response_topic=response if isinstance(response, str) else None,
                correlation_data=bytes(correlation) if correlation else None,
                now=now,
            )
        except Exception:
            # One odd message must never take the downlink down (a raise here would end
            # the session and reconnect): log it, drop it.
            self._log.exception("command.failed", topic=clip(str(message.topic)))
            return
        if reply is None:
            return
        self.handled += 1
        if len(self._replies) >= MAX_REPLIES_IN_FLIGHT:
            # The broker does not acknowledge our answers (a flood in front of them): this
            # one is lost like any unacknowledged answer; the platform resends by command_id.
            self.replies_dropped += 1
            return
        # Sent by its own task: waiting here for each PUBACK, which queues behind whatever
        # a flood put in front of it, would leave the inbox unread meanwhile.
        task = asyncio.create_task(self._answer(client, reply))
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    async def _answer(self, client: aiomqtt.Client, reply: Reply) -> None:
        properties = None
        if self._v5 and reply.correlation_data is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = reply.correlation_data
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            # A lost answer is not retried: the platform resends by command_id, and the
            # tracker answers a repeated command_id with its first verdict.
            async with asyncio.timeout(self._s.connect_timeout):
                await client.publish(
                    reply.topic, reply.payload, qos=1, retain=False, properties=properties
                )
