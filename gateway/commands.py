"""Order commands from platforms: the MQTT downlink and its responses.

A platform publishes ``assign-order`` or ``cancel-order`` to
``{prefix}/{site}/{area}/{line}/{machine}/cmd/{command}``. The listener

1. checks the topic names a machine of this gateway at that exact location,
2. refuses retained commands (a retained command would run again on every reconnect),
3. validates the payload (:func:`gateway.contract.decode_command`: size limit, JSON, fields),
4. hands the command to the machine's tracker through the runtime, which publishes the
   events it causes like any other,
5. answers every command it did not drop: on the MQTT 5 response topic with the correlation
   data when the command carried them, else on ``{command topic}/response``.

Commands come in on their own MQTT connection (client id ``{client_id}-cmd``), so a flood on
the downlink never sits in front of the event uplink. A token bucket bounds the work a flood
can cause: commands over the rate are counted and dropped without an answer, logged once per
flood with the count when it ends.

A response topic chosen by the client must not point into this gateway's own tree (other
than a ``.../response`` topic), so a command can never make the gateway publish a fake
event or state.

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
from typing import Protocol

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.backoff import Backoff
from gateway.contract import (
    RESPONSE_SUFFIX,
    CommandError,
    decode_command,
    encode_response,
    error_response,
)
from gateway.envelope import Topics, parse_machine_topic
from gateway.model import Location
from gateway.publisher import BrokerSettings, tls_context
from gateway.routing import RouteRules, machine_visible, order_visible
from gateway.tracker import AssignOrder, CancelOrder, CommandResult

#: Seconds without a dropped command that end a flood episode.
FLOOD_QUIET = 1.0
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
    """Where the answer goes: the client's response topic when it is safe, else the default."""
    default = command_topic + RESPONSE_SUFFIX
    if not requested:
        return default
    if any(c in requested for c in "+#\x00") or len(requested) > 512:
        return default
    # Inside our own tree only response topics are allowed: an answer must never land on
    # an event, state or status topic where consumers would take it for the real thing.
    if requested.startswith(prefix + "/") and not requested.endswith(RESPONSE_SUFFIX):
        return default
    return requested


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
    command = parsed.name
    machine = parsed.location.machine
    where = reply_topic(prefix, topic, response_topic)

    def reject(reason: str, command_id: str | None = None, order_id: str | None = None) -> Reply:
        log.warning(
            "command.rejected",
            machine=machine,
            command=command,
            command_id=command_id,
            order_id=order_id,
            reason=reason,
        )
        body = error_response(
            CommandError(reason, command_id=command_id, order_id=order_id),
            command=command,
            machine=machine,
            now=now,
        )
        return Reply(where, body, correlation_data)

    known = machines.get(machine) if machine_visible(rules, machine) else None
    if known is None or known != parsed.location:
        loc = parsed.location
        return reject(
            f"unknown machine {loc.area}/{loc.line}/{machine} on this gateway"
            if known is None
            else f"machine {machine} is at {known.area}/{known.line}, not {loc.area}/{loc.line}"
        )
    if retained:
        return reject("retained commands are not accepted; publish commands with retain=false")
    try:
        cmd = decode_command(command, payload)
    except CommandError as exc:
        return reject(str(exc), exc.command_id, exc.order_id)
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
    result = target.apply_command(machine, cmd, now)
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
        self._backoff = backoff or settings.backoff
        self._tls: ssl.SSLContext | None = (
            tls_context(settings.tls) if settings.tls is not None else None
        )
        self.handled = 0
        self.dropped = 0
        self._flood_dropped = 0
        self._last_drop = 0.0
        self._v5 = True
        self.subscribed = asyncio.Event()

    def _client(self) -> aiomqtt.Client:
        s = self._s
        return aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password,
            identifier=f"{s.client_id}-cmd",
            # MQTT 5 for response topics and correlation data; brokers that only speak
            # 3.1.1 get a 3.1.1 session and the default response topics.
            protocol=aiomqtt.ProtocolVersion.V5 if self._v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if self._v5 else True,
            keepalive=s.keepalive,
            timeout=s.connect_timeout,
            tls_context=self._tls,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )

    async def run(self) -> None:
        """Listen until cancelled; reconnects with backoff and never raises otherwise."""
        attempt = 0
        down_since: float | None = None
        while True:
            try:
                async with self._client() as client:
                    await client.subscribe(self._topics.all_commands_filter(), qos=1)
                    self.subscribed.set()
                    if down_since is not None:
                        self._log.info(
                            "command.listener_reconnected",
                            outage_s=round(self._clock() - down_since, 1),
                        )
                    attempt, down_since = 0, None
                    async for message in client.messages:
                        await self._on_message(client, message)
                        if _being_cancelled():
                            # Python 3.11's wait_for (inside aiomqtt) can swallow a cancel
                            # that coincides with a completion; honour it here.
                            raise asyncio.CancelledError
            except asyncio.CancelledError:
                raise
            except aiomqtt.MqttError as exc:
                self.subscribed.clear()
                if _being_cancelled():
                    # aiomqtt turns a cancel that lands in its clean-up into an MqttError;
                    # reconnecting now would outlive the gateway's shutdown.
                    raise asyncio.CancelledError from exc
                text = str(exc)
                if self._v5 and "protocol" in text.lower():
                    self._v5 = False
                    self._log.info("command.listener_mqtt311", reason=text)
                    continue
                if down_since is None:
                    down_since = self._clock()
                    self._log.warning("command.listener_unreachable", error=text)
                else:
                    self._log.debug("command.listener_unreachable", error=text, attempts=attempt)
            except Exception:  # never let a bug here take the gateway down
                self.subscribed.clear()
                if _being_cancelled():
                    raise asyncio.CancelledError from None
                self._log.exception("command.listener_failed")
                if down_since is None:
                    down_since = self._clock()
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1

    async def _on_message(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        now = self._clock()
        if not self._bucket.take(now):
            self.dropped += 1
            self._flood_dropped += 1
            self._last_drop = now
            if self._flood_dropped == 1:
                self._log.warning("command.flood", rate_per_s=self._bucket.rate)
            return
        # A flood ends after a quiet second, not with the first command the refilling
        # bucket lets through: one warning per flood, one line with the count at its end.
        if self._flood_dropped and now - self._last_drop >= FLOOD_QUIET:
            self._log.info("command.flood_ended", dropped=self._flood_dropped)
            self._flood_dropped = 0
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
            self._log.exception("command.failed", topic=str(message.topic)[:200])
            return
        if reply is None:
            return
        self.handled += 1
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
