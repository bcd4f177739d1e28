"""OPC UA client adapter (the imperative shell): connect securely, resolve, subscribe or poll.

Every asyncua call of the gateway's client side lives here and in
:mod:`adapters.opcua.security`. asyncua's own reconnect supervisor is switched off: the
gateway's device supervisor re-enters this adapter with backoff, and each entry builds a
fresh client, session and subscription (so monitored items never pile up on the server).

Per session, on ``__aenter__``:

1. security set-up and server certificate check (:mod:`adapters.opcua.security`);
2. connect and activate the session (anonymous, username/password or X.509 user);
3. read the namespace array and the server's operation limits
   (``MaxNodesPerRead``, ``MaxMonitoredItemsPerCall``, ``MaxNodesPerTranslateBrowsePaths...``);
4. resolve NodeIds (``nsu=`` by URI) and browse paths (TranslateBrowsePathsToNodeIds, chunked);
   a signal that does not resolve is bad, the others carry on;
5. subscription mode: one subscription, monitored items created in chunks, an absolute
   deadband filter for signals with a ``deadband``.

``samples()`` first yields one full Read of every node (initial values, and the values that
changed while the link was down), then either the coalesced data-change notifications
(subscription) or one chunked Read per poll interval (polling).

Quality: the StatusCode's severity (Good, Uncertain, Bad; see :mod:`adapters.opcua.values`).
A bad status, an unresolvable node or an unusable value makes that one signal bad; a dead
link, a timeout or a server that stops publishing raises :class:`~adapters.base.ConnectionLost`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import structlog
from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import (
    DataChangeEvent,
    OverflowPolicy,
    StatusChangeEvent,
    SubEvent,
    Subscription,
)
from asyncua.common.utils import NotEnoughData
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError, UaStructParsingError

from gateway.core.model import Quality, Sample
from shopfloor_gateway.adapters.base import (
    Acquisition,
    ConnectError,
    ConnectionLost,
    check_timing,
    next_deadline,
)
from shopfloor_gateway.adapters.opcua import security
from shopfloor_gateway.adapters.opcua.config import (
    OpcUaConnectionConfig,
    OpcUaSignalConfig,
    sampling_for,
)
from shopfloor_gateway.adapters.opcua.nodes import (
    BrowsePath,
    NodeAddress,
    chunks,
    effective_limit,
    parse_browse_path,
    parse_node_id,
)
from shopfloor_gateway.adapters.opcua.values import is_newer, to_sample

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Status codes of a refused user identity.
_AUTH_CODES = frozenset(
    {
        StatusCodes.BadUserAccessDenied,
        StatusCodes.BadIdentityTokenRejected,
        StatusCodes.BadIdentityTokenInvalid,
    }
)
#: Status codes of a refused client certificate or secure channel.
_CERT_CODES = frozenset(
    {
        StatusCodes.BadSecurityChecksFailed,
        StatusCodes.BadCertificateUntrusted,
        StatusCodes.BadCertificateInvalid,
        StatusCodes.BadCertificateTimeInvalid,
        StatusCodes.BadCertificateUriInvalid,
        StatusCodes.BadCertificateRevoked,
        StatusCodes.BadCertificateUseNotAllowed,
        StatusCodes.BadSecurityPolicyRejected,
    }
)
#: Monitored-item results after which the item is retried without its deadband filter
#: (the node is not numeric, or the server does not do deadbands).
_FILTER_CODES = frozenset(
    {
        StatusCodes.BadFilterNotAllowed,
        StatusCodes.BadMonitoredItemFilterUnsupported,
        StatusCodes.BadDeadbandFilterInvalid,
    }
)
_OPERATION_LIMITS = (
    ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
    ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
    ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerTranslateBrowsePathsToNodeIds,
)
#: Notifications held in asyncua's queue before the subscription forces a reconnect
#: (which re-reads everything) rather than silently dropping changes.
_QUEUE_MAX = 10_000
#: Notifications per yielded batch at most, so a flood still reaches the core in pieces.
_BATCH_MAX = 5_000


class _TeardownNoise(logging.Filter):
    """Drop asyncua's warnings about closing a session whose link is already gone.

    After a lost link the adapter still closes the client to stop its background tasks;
    asyncua then warns that the connection is closed, which is the expected state.
    """

    _MESSAGES = (
        "close_session was called but connection is closed",
        "close_session but connection wasn't established",
        "close_secure_channel was called but connection is closed",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record except the three teardown messages."""
        return not any(record.getMessage().startswith(m) for m in self._MESSAGES)


for _name in ("asyncua.client.ua_session.UaSession", "asyncua.client.ua_client.UaClient"):
    logging.getLogger(_name).addFilter(_TeardownNoise())


@dataclass(frozen=True, slots=True)
class _Target:
    """One signal's compiled address."""

    signal: str
    address: NodeAddress | None
    path: BrowsePath | None
    array_index: int | None
    #: Absolute deadband in device units for the monitored item (0: none).
    deadband: float


class OpcUaAdapter:
    """One OPC UA server connection yielding batches of samples (subscription or polling)."""

    def __init__(
        self,
        machine: str,
        connection: OpcUaConnectionConfig,
        signals: Mapping[str, OpcUaSignalConfig],
        poll_interval: float,
        *,
        start_offset: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Compile the signal addresses; raise ``ValueError`` for an unusable interval."""
        check_timing(poll_interval, start_offset)
        self._machine = machine
        self._conn = connection
        self._interval = poll_interval
        self._start_offset = start_offset
        self._clock = clock
        self._publishing = connection.publishing_interval or poll_interval
        self._sampling = sampling_for(connection.sampling_interval, self._publishing)
        self._targets: dict[str, _Target] = {
            name: _Target(
                signal=name,
                address=parse_node_id(sig.node_id) if sig.node_id is not None else None,
                path=parse_browse_path(sig.browse_path) if sig.browse_path is not None else None,
                array_index=sig.array_index,
                # The mapping scales after the adapter; the server filters raw values.
                deadband=sig.deadband / abs(sig.scale) if sig.deadband and sig.scale else 0.0,
            )
            for name, sig in signals.items()
        }
        self._root = parse_node_id(connection.root)
        self._client: Client | None = None
        self._sub: Subscription | None = None
        self._lost: asyncio.Future[str] | None = None
        self._watch: asyncio.Task[None] | None = None
        # Per session: resolved nodes, signals that could not be resolved or monitored.
        self._nodes: dict[str, ua.NodeId] = {}
        self._unresolved: dict[str, str] = {}
        self._handles: dict[int, str] = {}
        self._read_limit: int | None = None
        self._monitor_limit: int | None = None
        self._translate_limit: int | None = None
        # Across sessions: newest source time per signal, signals currently bad (one
        # warning per episode), the last refusal logged (one warning per cause).
        self._last_seen: dict[str, float] = {}
        self._bad: dict[str, str] = {}
        self._refusal: str | None = None
        #: Read service calls sent (all sessions): the operation-limit chunking is observable.
        self.read_requests = 0
        #: CreateMonitoredItems service calls sent (all sessions).
        self.monitor_requests = 0
        self._log = log.bind(machine=machine, url=connection.url)
        #: Whether the latest batch was a read (and how long it took) or notifications.
        self.acquisition = Acquisition()

    @property
    def machine(self) -> str:
        """The machine this adapter reads."""
        return self._machine

    @property
    def intervals(self) -> tuple[float, float]:
        """``(sampling, publishing)`` intervals in seconds that subscriptions ask for."""
        return self._sampling, self._publishing

    @property
    def monitored_items(self) -> int:
        """Monitored items of the current subscription (0 when polling or closed)."""
        return len(self._handles)

    @property
    def limits(self) -> tuple[int | None, int | None]:
        """Effective ``(max nodes per Read, max monitored items per call)`` of this session."""
        return self._read_limit, self._monitor_limit

    # -- connect / release -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Connect, resolve and subscribe within timeouts; raise :class:`ConnectError`."""
        conn = self._conn
        client = new_client(conn, self._machine)
        try:
            await connect(client, conn, self._clock())
        except ConnectFailed as failed:
            error = self._connect_error(failed.cause, secured_handshake=failed.secured_handshake)
            raise error from failed.cause
        self._client = client
        try:
            self._lost = asyncio.get_running_loop().create_future()
            self._watch = asyncio.create_task(
                self._watch_state(client, self._lost), name=f"opcua-watch[{self._machine}]"
            )
            await self._prepare(client)
        except ConnectionLost as exc:
            await self._release()
            raise ConnectError(f"{conn.url}: connection lost while setting up: {exc}") from exc
        except (UaError, ConnectionError, OSError, TimeoutError) as exc:
            await self._release()
            raise ConnectError(
                f"{conn.url}: setting up the session failed: {_explain(exc)}"
            ) from exc
        except BaseException:
            await self._release()
            raise
        if self._refusal is not None:
            self._log.info("opcua.session_accepted")
            self._refusal = None
        self._log.debug(
            "opcua.connected",
            mode=conn.mode,
            nodes=len(self._nodes),
            unresolved=len(self._unresolved),
            monitored_items=self.monitored_items,
            max_nodes_per_read=self._read_limit,
            max_monitored_items_per_call=self._monitor_limit,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the session (deleting its subscription) within the timeout, whatever happened."""
        await self._release()

    async def _release(self) -> None:
        """Stop the watcher, close session and socket; bounded by ``timeout``, never raises."""
        watch, self._watch = self._watch, None
        if watch is not None:
            await _reap(watch)
        client, self._client = self._client, None
        lost, self._lost = self._lost, None
        self._sub = None
        self._handles = {}
        if client is None:
            return
        try:
            async with asyncio.timeout(self._conn.timeout):
                if lost is not None and lost.done():
                    # The link is gone: only stop the client's tasks; the server's session
                    # timeout removes the session and its subscription.
                    client.uaclient.request_disconnect()
                    client.disconnect_socket()
                # CloseSession(DeleteSubscriptions=True) also removes the monitored items.
                await client.disconnect()
        except asyncio.CancelledError:
            client.disconnect_socket()
            raise
        except Exception as exc:  # closing is best effort; the socket goes below anyway
            self._log.debug("opcua.close_failed", error=_explain(exc))
        finally:
            client.disconnect_socket()
        self._log.debug("opcua.closed")

    def _connect_error(self, exc: Exception, *, secured_handshake: bool = False) -> ConnectError:
        """Translate a failed connect into a :class:`ConnectError` that says what to do.

        Refusals are logged once per cause (see :func:`explain_connect_error`).
        """
        event, error = explain_connect_error(self._conn, exc, secured_handshake=secured_handshake)
        if event is not None:
            self._note_refusal(event, str(error))
        return error

    def _note_refusal(self, event: str, message: str) -> None:
        """Log a refusal at warning once per cause; repeats at debug."""
        if message != self._refusal:
            self._log.warning(event, error=message)
            self._refusal = message
        else:
            self._log.debug(event, error=message)

    @staticmethod
    async def _watch_state(client: Client, lost: asyncio.Future[str]) -> None:
        """Resolve ``lost`` as soon as the client leaves the connected state."""
        async with client.subscribe_state() as changes:
            while client.state is UaClientState.CONNECTED:
                await changes.next_change()
        if not lost.done():
            lost.set_result(f"connection state {client.state.value}")

    # -- session set-up --------------------------------------------------------------------

    async def _prepare(self, client: Client) -> None:
        """Namespaces, operation limits, node resolution and (subscription mode) monitoring."""
        self._nodes = {}
        self._unresolved = {}
        self._handles = {}
        namespaces = await self._call(client.get_namespace_array(), "reading the namespace array")
        await self._read_limits(client)
        self._resolve_node_ids(list(namespaces))
        await self._resolve_paths(client, list(namespaces))
        for name, reason in self._unresolved.items():
            if self._bad.get(name) != reason:
                self._log.warning("opcua.signal_unresolved", signal=name, reason=reason)
                self._bad[name] = reason
        if self._conn.mode == "subscription":
            await self._subscribe(client)

    async def _read_limits(self, client: Client) -> None:
        """Read the server's operation limits; a missing or bad limit means none."""
        params = ua.ReadParameters()
        params.NodesToRead = [
            ua.ReadValueId(NodeId=_numeric(i), AttributeId=AttributeIds.Value)
            for i in _OPERATION_LIMITS
        ]
        results = await self._call(client.uaclient.read(params), "reading operation limits")
        found: list[int | None] = []
        for dv in results:
            value = dv.Value.Value if dv.Value is not None else None
            good = dv.StatusCode is None or dv.StatusCode.is_good()
            ok = good and isinstance(value, int) and not isinstance(value, bool) and value > 0
            found.append(int(value) if ok and isinstance(value, int) else None)
        found += [None] * (3 - len(found))
        conn = self._conn
        self._read_limit = effective_limit(found[0], conn.max_nodes_per_read)
        self._monitor_limit = effective_limit(found[1], conn.max_monitored_items_per_call)
        self._translate_limit = effective_limit(found[2], None)

    def _namespace(self, uri: str, namespaces: Sequence[str]) -> int | None:
        """Index of a namespace URI on this server."""
        try:
            return namespaces.index(uri)
        except ValueError:
            return None

    def _node_id(self, address: NodeAddress, namespaces: Sequence[str]) -> ua.NodeId | str:
        """An asyncua NodeId, or the reason it cannot be built on this server."""
        index = address.namespace_index
        if address.namespace_uri is not None:
            found = self._namespace(address.namespace_uri, namespaces)
            if found is None:
                return f"namespace {address.namespace_uri!r} is not on the server"
            index = found
        kinds = {
            "i": ua.NodeIdType.Numeric,
            "s": ua.NodeIdType.String,
            "g": ua.NodeIdType.Guid,
            "b": ua.NodeIdType.ByteString,
        }
        return ua.NodeId(address.identifier, index, kinds[address.kind])  # type: ignore[arg-type]

    def _resolve_node_ids(self, namespaces: Sequence[str]) -> None:
        """Signals addressed by NodeId."""
        for name, target in self._targets.items():
            if target.address is None:
                continue
            node = self._node_id(target.address, namespaces)
            if isinstance(node, str):
                self._unresolved[name] = f"node_id {target.address}: {node}"
            else:
                self._nodes[name] = node

    async def _resolve_paths(self, client: Client, namespaces: Sequence[str]) -> None:
        """Signals addressed by browse path: TranslateBrowsePathsToNodeIds, chunked."""
        pending: list[tuple[str, ua.BrowsePath]] = []
        root = self._node_id(self._root, namespaces)
        for name, target in self._targets.items():
            if target.path is None:
                continue
            if isinstance(root, str):
                self._unresolved[name] = f"root {self._conn.root}: {root}"
                continue
            built = self._browse_path(root, target.path, namespaces)
            if isinstance(built, str):
                self._unresolved[name] = f"browse_path {target.path}: {built}"
            else:
                pending.append((name, built))
        for part in chunks(pending, self._translate_limit):
            results = await self._call(
                client.uaclient.translate_browsepaths_to_nodeids([bp for _, bp in part]),
                "resolving browse paths",
            )
            for (name, _), result in zip(part, results, strict=False):
                path = self._targets[name].path
                if not result.StatusCode.is_good() or not result.Targets:
                    status = result.StatusCode.name if result.StatusCode else "no target"
                    self._unresolved[name] = f"browse_path {path} does not resolve ({status})"
                    continue
                target_id = result.Targets[0].TargetId
                self._nodes[name] = ua.NodeId(
                    target_id.Identifier, target_id.NamespaceIndex, target_id.NodeIdType
                )

    def _browse_path(
        self, root: ua.NodeId, path: BrowsePath, namespaces: Sequence[str]
    ) -> ua.BrowsePath | str:
        """An asyncua BrowsePath following hierarchical references, or why it cannot be built."""
        elements = []
        for seg in path.segments:
            ns: int | str | None = seg.namespace
            if ns is None:
                ns = self._conn.default_namespace if self._conn.default_namespace else 0
            if isinstance(ns, str):
                uri = self._conn.namespaces.get(ns)
                if uri is None:
                    return f"namespace alias {ns!r} is not in connection.namespaces"
                index = self._namespace(uri, namespaces)
                if index is None:
                    return f"namespace {uri!r} (alias {ns}) is not on the server"
                ns = index
            elements.append(
                ua.RelativePathElement(
                    ReferenceTypeId=_numeric(ObjectIds.HierarchicalReferences),
                    IsInverse=False,  # type: ignore[arg-type]
                    IncludeSubtypes=True,  # type: ignore[arg-type]
                    TargetName=ua.QualifiedName(seg.name, ns),
                )
            )
        return ua.BrowsePath(StartingNode=root, RelativePath=ua.RelativePath(Elements=elements))

    async def _subscribe(self, client: Client) -> None:
        """One subscription; monitored items in chunks of the server's per-call limit."""
        publishing_ms = self._publishing * 1000
        # Keep-alives every ~5 s at most; the subscription dies about when the session
        # would, so an abandoned one does not linger on the server.
        keepalive = max(1, math.ceil(min(5.0, self._conn.session_timeout / 4) / self._publishing))
        lifetime = max(3 * keepalive, math.ceil(self._conn.session_timeout / self._publishing))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=publishing_ms,
            RequestedLifetimeCount=lifetime,
            RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        sub = await self._call(
            client.create_subscription(
                params, handler=None, queue_maxsize=_QUEUE_MAX, overflow=OverflowPolicy.DISCONNECT
            ),
            "creating the subscription",
        )
        self._sub = sub
        names = [n for n in self._targets if n in self._nodes]
        requests = {
            handle: (name, self._item(handle, name, filtered=True))
            for handle, name in enumerate(names, start=1)
        }
        retry: list[tuple[int, str]] = []
        await self._create_items(sub, requests, retry)
        if retry:
            self._log.info(
                "opcua.deadband_unsupported", signals=sorted(n for _, n in retry), retrying=True
            )
            await self._create_items(
                sub, {h: (n, self._item(h, n, filtered=False)) for h, n in retry}, None
            )

    def _item(self, handle: int, name: str, *, filtered: bool) -> ua.MonitoredItemCreateRequest:
        """A monitored-item request for one signal."""
        params = ua.MonitoringParameters(
            ClientHandle=handle,
            SamplingInterval=self._sampling * 1000,
            QueueSize=self._conn.queue_size,
            DiscardOldest=True,
        )
        deadband = self._targets[name].deadband
        if filtered and deadband > 0:
            params.Filter = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValue,
                DeadbandType=ua.DeadbandType.Absolute,
                DeadbandValue=deadband,
            )
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(NodeId=self._nodes[name], AttributeId=AttributeIds.Value),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=params,
        )

    async def _create_items(
        self,
        sub: Subscription,
        requests: Mapping[int, tuple[str, ua.MonitoredItemCreateRequest]],
        retry: list[tuple[int, str]] | None,
    ) -> None:
        """CreateMonitoredItems in chunks; failures make their signal bad (or go to ``retry``)."""
        pending = list(requests.items())
        index = 0
        while index < len(pending):
            size = self._monitor_limit or len(pending)
            part = pending[index : index + size]
            try:
                results = await self._call(
                    sub.create_monitored_items([req for _, (_, req) in part]),
                    "creating monitored items",
                )
            except UaStatusCodeError as exc:
                if exc.code == StatusCodes.BadTooManyOperations and len(part) > 1:
                    self._monitor_limit = max(1, len(part) // 2)
                    self._log.info("opcua.limit_lowered", monitor_limit=self._monitor_limit)
                    continue
                raise
            finally:
                self.monitor_requests += 1
            for (handle, (name, req)), result in zip(part, results, strict=False):
                if isinstance(result, ua.StatusCode):
                    filtered = req.RequestedParameters.Filter is not None
                    if retry is not None and filtered and result.value in _FILTER_CODES:
                        retry.append((handle, name))
                        continue
                    reason = f"cannot monitor {self._nodes[name].to_string()} ({result.name})"
                    self._unresolved[name] = reason
                    if self._bad.get(name) != reason:
                        self._log.warning("opcua.signal_unresolved", signal=name, reason=reason)
                        self._bad[name] = reason
                else:
                    self._handles[handle] = name
            index += len(part)

    # -- acquisition -----------------------------------------------------------------------

    async def samples(self) -> AsyncIterator[list[Sample]]:
        """Yield the initial full read, then one batch per notification or poll cycle."""
        if self._client is None or self._lost is None:
            raise RuntimeError("OpcUaAdapter.samples() needs 'async with adapter:' first")
        loop = asyncio.get_running_loop()
        if self._start_offset:
            await asyncio.sleep(self._start_offset)
        try:
            deadline = loop.time()
            yield await self._timed_read(loop)
            if self._conn.mode == "polling":
                while True:
                    deadline, skipped = next_deadline(deadline, loop.time(), self._interval)
                    if skipped:
                        self.acquisition.missed_deadlines += skipped
                        self._log.debug("opcua.ticks_skipped", skipped=skipped)
                    delay = deadline - loop.time()
                    if delay > 0:
                        await self._sleep(delay)
                    yield await self._timed_read(loop)
            else:
                while True:
                    batch = await self._next_batch()
                    if batch:
                        self.acquisition.kind = "notification"
                        self.acquisition.seconds = None
                        yield batch
                    del batch  # not kept while waiting (see ModbusAdapter.samples)
        except (UaError, ConnectionError, OSError) as exc:
            raise ConnectionLost(f"{self._conn.url}: {_explain(exc)}") from exc

    async def _timed_read(self, loop: asyncio.AbstractEventLoop) -> list[Sample]:
        """One full Read, kept in :attr:`acquisition` as a poll with its duration."""
        # perf_counter: uvloop's loop.time() is cached per turn in whole milliseconds.
        started = time.perf_counter()
        batch = await self._read_all()
        self.acquisition.kind = "poll"
        self.acquisition.seconds = time.perf_counter() - started
        return batch

    async def _sleep(self, delay: float) -> None:
        """Sleep, but end at once with :class:`ConnectionLost` when the link drops."""
        lost = self._lost
        assert lost is not None
        done, _ = await asyncio.wait((lost,), timeout=delay)
        if done:
            raise ConnectionLost(f"{self._conn.url}: {lost.result()}")

    async def _read_all(self) -> list[Sample]:
        """One sample per signal: chunked Reads of the resolved nodes, bad for the rest."""
        client = self._client
        if client is None:
            raise ConnectionLost(f"{self._conn.url}: not connected")
        names = [n for n in self._targets if n in self._nodes and n not in self._unresolved]
        values: dict[str, ua.DataValue] = {}
        index = 0
        while index < len(names):
            size = self._read_limit or len(names)
            part = names[index : index + size]
            params = ua.ReadParameters()
            params.TimestampsToReturn = ua.TimestampsToReturn.Both
            params.NodesToRead = [
                ua.ReadValueId(NodeId=self._nodes[n], AttributeId=AttributeIds.Value) for n in part
            ]
            self.read_requests += 1
            try:
                results = await self._call(client.uaclient.read(params), "reading values")
            except UaStatusCodeError as exc:
                if exc.code == StatusCodes.BadTooManyOperations and len(part) > 1:
                    # The server's advertised limit was wrong (or missing): halve and retry.
                    self._read_limit = max(1, len(part) // 2)
                    self._log.info("opcua.limit_lowered", read_limit=self._read_limit)
                    continue
                raise
            if len(results) != len(part):
                raise ConnectionLost(
                    f"{self._conn.url}: server answered {len(results)} values for {len(part)} nodes"
                )
            values.update(zip(part, results, strict=True))
            index += len(part)
        now = self._clock()
        batch: list[Sample] = []
        problems: dict[str, str] = {}
        for name in self._targets:
            if name in values:
                sample, reason = self._to_sample(name, values[name], now)
            else:
                reason = self._unresolved.get(name, "not resolved")
                sample = Sample(self._machine, name, None, now, Quality.BAD)
            if reason is not None:
                problems[name] = reason
            self._last_seen[name] = sample.source_time
            batch.append(sample)
        self._track(problems, set(self._targets))
        return batch

    async def _next_batch(self) -> list[Sample]:
        """Wait for notifications; coalesce what arrives within ``coalesce`` seconds."""
        loop = asyncio.get_running_loop()
        first = await self._next_event(None)
        events: list[SubEvent] = [] if first is None else [first]
        # A flood must still come out in pieces: stop after one publishing interval.
        until = loop.time() + self._publishing
        while len(events) < _BATCH_MAX and loop.time() < until:
            event = await self._next_event(self._conn.coalesce)
            if event is None:
                break
            events.append(event)
        now = self._clock()
        batch: list[Sample] = []
        problems: dict[str, str] = {}
        seen: set[str] = set()
        for event in events:
            if isinstance(event, StatusChangeEvent):
                status = event.notification.Status
                if status is not None and not status.is_good():
                    raise ConnectionLost(
                        f"{self._conn.url}: the server ended the subscription ({status.name})"
                    )
                continue
            if not isinstance(event, DataChangeEvent):
                continue
            handle = event.data.subscription_data.client_handle
            name = self._handles.get(handle) if handle is not None else None
            dv = event.data.monitored_item.Value
            if name is None or dv is None:
                continue
            sample, reason = self._to_sample(name, dv, now)
            if not is_newer(self._last_seen.get(name), sample.source_time):
                # A replayed or late notification older than a value already read.
                continue
            self._last_seen[name] = sample.source_time
            seen.add(name)
            if reason is not None:
                problems[name] = reason
            else:
                problems.pop(name, None)
            batch.append(sample)
        self._track(problems, seen)
        return batch

    async def _next_event(self, wait: float | None) -> SubEvent | None:
        """The next subscription event, ``None`` after ``wait`` s; ConnectionLost on a drop."""
        sub, lost = self._sub, self._lost
        if sub is None or lost is None:
            raise ConnectionLost(f"{self._conn.url}: not subscribed")
        if lost.done():
            raise ConnectionLost(f"{self._conn.url}: {lost.result()}")
        getter: asyncio.Task[SubEvent] = asyncio.ensure_future(sub.__anext__())
        try:
            await asyncio.wait((getter, lost), timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                await _reap(getter)
        if getter.done() and not getter.cancelled():
            try:
                return getter.result()
            except StopAsyncIteration:
                raise ConnectionLost(f"{self._conn.url}: the subscription was closed") from None
        if lost.done():
            raise ConnectionLost(f"{self._conn.url}: {lost.result()}")
        return None

    def _to_sample(self, name: str, dv: ua.DataValue, now: float) -> tuple[Sample, str | None]:
        """Unwrap a DataValue and map it (see :mod:`adapters.opcua.values`)."""
        variant = dv.Value
        status = dv.StatusCode
        return to_sample(
            self._machine,
            name,
            value=variant.Value if variant is not None else None,
            variant_type=variant.VariantType.name if variant is not None else None,
            status_code=status.value if status is not None else 0,
            status_name=status.name if status is not None else None,
            source_timestamp=dv.SourceTimestamp,
            now=now,
            array_index=self._targets[name].array_index,
        )

    def _track(self, problems: Mapping[str, str], covered: set[str]) -> None:
        """Warn once when a signal turns bad; note at info when a covered signal is good again."""
        for name, reason in problems.items():
            if name not in self._bad:
                self._log.warning("opcua.signal_bad", signal=name, reason=reason)
            elif self._bad[name] != reason:
                self._log.debug("opcua.signal_bad", signal=name, reason=reason)
            self._bad[name] = reason
        for name in [n for n in self._bad if n in covered and n not in problems]:
            del self._bad[name]
            self._log.info("opcua.signal_recovered", signal=name)

    async def _call(self, request: Awaitable[T], what: str) -> T:
        """Await one request under ``timeout``; a drop or timeout becomes ConnectionLost."""
        lost = self._lost
        task: asyncio.Future[T] = asyncio.ensure_future(request)
        waiters: set[asyncio.Future[Any]] = {task} if lost is None else {task, lost}
        try:
            async with asyncio.timeout(self._conn.timeout):
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise ConnectionLost(
                f"{self._conn.url}: no answer within {self._conn.timeout} s {what}"
            ) from None
        finally:
            if not task.done():
                await _reap(task)
        if task.cancelled():
            reason = lost.result() if lost is not None and lost.done() else "cancelled"
            raise ConnectionLost(f"{self._conn.url}: {reason} while {what}")
        try:
            return task.result()
        except (ConnectionError, OSError, TimeoutError) as exc:
            raise ConnectionLost(f"{self._conn.url}: {what} failed: {_explain(exc)}") from exc


def explain_connect_error(
    conn: OpcUaConnectionConfig, exc: Exception, *, secured_handshake: bool = False
) -> tuple[str | None, ConnectError]:
    """A failed connect as a :class:`ConnectError` that says what to do, and its log event.

    The event (``opcua.certificate_refused``, ``opcua.auth_refused``,
    ``opcua.server_refused``) is ``None`` for causes that are not refusals.
    ``secured_handshake``: the server answered the unsecured endpoint discovery just
    before, and the failure came during the secured channel and session set-up.
    """
    if secured_handshake and is_handshake_breakoff(exc):
        return "opcua.certificate_refused", ConnectError(channel_refusal_message(conn, exc))
    if isinstance(exc, ConnectError):
        if isinstance(exc, security.UntrustedServerError | security.SecuritySetupError):
            return "opcua.server_refused", exc
        return None, exc
    if isinstance(exc, TimeoutError):
        return None, ConnectError(
            f"cannot connect to {conn.url}: no answer within {conn.timeout} s"
        )
    if isinstance(exc, UaStatusCodeError):
        code = exc.code
        name = ua.StatusCode(code).name
        if code in _AUTH_CODES:
            who = (
                f"user {conn.username!r}"
                if conn.username
                else "the certificate user identity"
                if conn.user_certificate
                else "anonymous access"
            )
            hint = (
                "check username and password"
                if conn.username
                else "configure username/password or a user certificate the server accepts"
            )
            message = f"server {conn.url} refused {who} ({name}): {hint}"
            return "opcua.auth_refused", ConnectError(message)
        if code in _CERT_CODES:
            message = (
                f"server {conn.url} refused the gateway's certificate ({name}): {_trust_hint(conn)}"
            )
            return "opcua.certificate_refused", ConnectError(message)
        return None, ConnectError(f"server {conn.url} refused the session: {name}")
    if isinstance(exc, UaError | OSError | ConnectionError):
        return None, ConnectError(f"cannot connect to {conn.url}: {_explain(exc)}")
    return None, ConnectError(f"cannot connect to {conn.url}: {type(exc).__name__}: {exc}")


def new_client(conn: OpcUaConnectionConfig, name: str) -> Client:
    """An asyncua client as the gateway configures it (no own reconnects, its identity)."""
    client = Client(
        conn.url,
        timeout=conn.timeout,
        watchdog_intervall=conn.watchdog_interval,
        auto_reconnect=False,
    )
    client.session_timeout = round(conn.session_timeout * 1000)
    client.application_uri = security.default_application_uri(conn)
    client.name = f"Shopfloor Gateway ({name})"
    client.description = client.name
    client.product_uri = "urn:shopfloor-gateway"
    return client


async def connect(client: Client, conn: OpcUaConnectionConfig, now: float) -> None:
    """Security set-up, server check and session, within the timeouts; raise ConnectError.

    A failed attempt keeps no socket. Refusals are not logged here (the caller decides).
    """
    handshake = False
    try:
        async with asyncio.timeout(conn.timeout):
            await security.apply(client, conn, now)
        handshake = conn.security.policy != "None"
        # The handshake is several requests plus RSA work: allow two timeouts.
        async with asyncio.timeout(conn.timeout * 2):
            await client.connect()
    except BaseException as exc:
        # connect() starts no background tasks before the session is active.
        client.disconnect_socket()
        if isinstance(exc, Exception):
            raise ConnectFailed(exc, secured_handshake=handshake) from exc
        raise


class ConnectFailed(Exception):
    """A failed connect, with where it failed (for :func:`explain_connect_error`)."""

    def __init__(self, cause: Exception, *, secured_handshake: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.secured_handshake = secured_handshake


def is_handshake_breakoff(exc: BaseException) -> bool:
    """Whether a failed secured connect looks like a server breaking off the handshake.

    Servers that refuse the client certificate at OpenSecureChannel answer in several ways:
    an ERR message with a status (a :class:`UaStatusCodeError`, handled by its code), a
    ServiceFault where the channel response belongs (asyncua fails to parse it,
    ``NotEnoughData``, and then trips a bare ``AssertionError``), or simply closing the
    socket. The last two carry no reason; the endpoint discovery just before succeeded on
    the same address, so the certificate is by far the likeliest cause.
    """
    if isinstance(exc, ConnectionRefusedError):
        return False
    return isinstance(
        exc,
        AssertionError
        | NotEnoughData
        | UaStructParsingError
        | ConnectionError
        | asyncio.IncompleteReadError
        | EOFError,
    )


def _trust_hint(conn: OpcUaConnectionConfig) -> str:
    """How to make the server trust the gateway's certificate."""
    return (
        f"trust {str(conn.security.certificate)!r} on the server (usually by moving it from "
        "the server's rejected to its trusted certificate folder)"
    )


def channel_refusal_message(conn: OpcUaConnectionConfig, exc: BaseException) -> str:
    """The message for a secured handshake the server broke off without a status."""
    what = type(exc).__name__
    return (
        f"server {conn.url} broke off the secure channel ({conn.security.policy}) without a "
        f"reason (asyncua: {what}); servers do this when they do not trust the gateway's "
        f"certificate: {_trust_hint(conn)}"
    )


async def _reap(task: asyncio.Future[Any]) -> None:
    """Cancel a helper task and wait for it, without swallowing our own cancellation.

    A bare ``suppress(CancelledError)`` around the await would also eat a cancel aimed at
    the caller (SIGTERM stopping the device) that lands during it, and the device task
    would run on after shutdown.
    """
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:  # the helper's own failure is not the caller's business here
        pass


def _numeric(identifier: int) -> ua.NodeId:
    """A namespace-0 numeric NodeId (asyncua's stubs type the identifier as a NewType)."""
    return ua.NodeId(identifier)  # type: ignore[arg-type]


def _explain(exc: BaseException) -> str:
    """A short readable cause: the status name for OPC UA errors, else the message."""
    if isinstance(exc, UaStatusCodeError):
        return ua.StatusCode(exc.code).name
    text = str(exc) or type(exc).__name__
    return text


def create(
    machine: str,
    connection: OpcUaConnectionConfig,
    signals: Mapping[str, OpcUaSignalConfig],
    poll_interval: float,
    start_offset: float = 0.0,
) -> OpcUaAdapter:
    """Factory for the protocol registry."""
    return OpcUaAdapter(machine, connection, signals, poll_interval, start_offset=start_offset)
