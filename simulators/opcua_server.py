"""OPC UA server shell for the simulated CNC machine and robot (all asyncua calls live here).

``OpcUaMachineServer`` serves one model (:class:`simulators.cnc.CncModel` or
:class:`simulators.robot.RobotModel`) on one TCP port: it builds the model's address space
once, then a tick task advances the model in scenario time and writes the values that
changed, each with the wall-clock SourceTimestamp of the change. ``stop()``/``start()``
close and reopen the listener on the same port while the scenario keeps going (a pulled
network cable); ``remove_node(key)`` makes a node answer BadNodeIdUnknown.

Latency probe (``probe=LatencyProbe(key, period)``): one String node (the CNC's order id,
``JobIdentifier``) no longer follows the scenario but changes on a jittered schedule
(:func:`simulators.load.change_time`, the Modbus load simulator's schedule) to
``L<epoch ms of the change>``, written the moment it is due, with that instant as its
SourceTimestamp. A subscriber in another process takes its receive time minus the stamp:
change -> arrival, without sharing a clock with anything but the host.

Security (``security=DIR``): on first start the server creates ``DIR/<name>-key.pem`` and a
self-signed ``DIR/<name>-cert.der`` (DER), and the folder ``DIR/trusted/``. Only the
Basic256Sha256 SignAndEncrypt endpoint is offered, and only clients whose certificate (DER or
PEM) lies in ``DIR/trusted/`` get a session; the folder is read again on every connect, so
trusting a client needs no restart. ``users={name: password}`` turns anonymous access off
and requires one of these user names and passwords.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import math
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog
from asyncua import ua
from asyncua.common.node import Node
from asyncua.common.utils import ServiceError
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from shopfloor_gateway.simulators.load import change_time
from shopfloor_gateway.simulators.opcua_common import (
    AddressSpace,
    NodeSpec,
    NodeValue,
    OpcUaMachineModel,
    check_value,
)
from shopfloor_gateway.simulators.opcua_sampling import sample_like_a_plc
from shopfloor_gateway.simulators.ticker import check_pace, run_ticks, stop_task, wait_finished

log = structlog.get_logger(__name__)

#: Security policy URI of the only secured endpoint offered.
SECURITY_POLICY_URI = "http://opcfoundation.org/UA/SecurityPolicy#Basic256Sha256"


def application_uri(name: str) -> str:
    """ApplicationUri of the simulated machine ``name`` (also in its certificate)."""
    return f"urn:shopfloor-gateway:simulator:{name}"


def certificate_paths(directory: Path, name: str) -> tuple[Path, Path]:
    """``(certificate, private key)`` files of machine ``name`` in a security folder."""
    return directory / f"{name}-cert.der", directory / f"{name}-key.pem"


def trusted_dir(directory: Path) -> Path:
    """Folder of client certificates a secured simulator accepts."""
    return directory / "trusted"


async def ensure_certificates(directory: Path, name: str) -> tuple[Path, Path]:
    """Create the folder, a key and a self-signed certificate unless they exist already."""
    # A few local directory calls at start-up; not worth a thread.
    directory.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    trusted_dir(directory).mkdir(exist_ok=True)
    cert, key = certificate_paths(directory, name)
    await setup_self_signed_certificate(
        key,
        cert,
        application_uri(name),
        socket.gethostname(),
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        {"commonName": f"shopfloor simulator {name}", "organizationName": "Shopfloor Gateway"},
    )
    return cert, key


@dataclass(frozen=True, slots=True)
class LatencyProbe:
    """Schedule of the latency probe: node ``key`` changes every ``period`` s (jittered).

    Change ``k`` is due at ``change_time(origin + phase * period, period, k)``: one per
    ``period`` slot, in its first half, at a fixed pseudo-random place. ``origin`` is wall-clock
    epoch seconds (0: the schedule is the same in every process); ``phase`` (a fraction of
    ``period``) shifts one machine's changes against another's.
    """

    key: str
    period: float
    phase: float = 0.0
    origin: float = 0.0

    def __post_init__(self) -> None:
        """Refuse a schedule that cannot run."""
        if not self.key:
            raise ValueError("latency probe: the node key must not be empty")
        period = self.period
        if not (isinstance(period, int | float) and math.isfinite(period) and period > 0):
            raise ValueError(
                f"latency probe period must be a number of seconds > 0, got {period!r}"
            )
        if not 0 <= self.phase < 1:
            raise ValueError(f"latency probe phase must be in [0, 1), got {self.phase!r}")
        if not math.isfinite(self.origin):
            raise ValueError(f"latency probe origin must be finite, got {self.origin!r}")

    def next_change(self, t: float) -> float:
        """The first change instant strictly after wall time ``t`` (pure)."""
        start = self.origin + self.phase * self.period
        k = max(0, math.floor((t - start) / self.period))
        # Change k lies in [start + k*period, start + (k+0.5)*period): if it is not after t,
        # change k+1 (in the next slot, so after t) is.
        at = change_time(start, self.period, k)
        return at if at > t else change_time(start, self.period, k + 1)


def probe_value(t: float) -> str:
    """The probe's value for a change at wall time ``t``: ``L<epoch milliseconds>``."""
    return f"L{round(t * 1000)}"


class _PasswordUsers(UserManager):
    """Accepts exactly the configured user names and passwords."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = dict(users)

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is None or password is None or username not in self._users:
            return None
        # Constant-time compare: the simulator stands in for a real device in tests.
        if hmac.compare_digest(self._users[username].encode(), password.encode()):
            return User(role=UserRole.User, name=username)
        return None


class _TrustFolderValidator:
    """Certificate check against the trusted folder, re-read on every connect."""

    def __init__(self, folder: Path) -> None:
        self._store = TrustStore([folder], [])
        self._validator = CertificateValidator(
            CertificateValidatorOptions.TRUSTED_VALIDATION
            | CertificateValidatorOptions.PEER_CLIENT,
            self._store,
        )

    async def __call__(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        try:
            await self._store.load_trust()
        except ValueError as exc:
            # asyncua refuses to build an empty store; an empty trusted folder (the state
            # right after the first start) means "trust nobody", not an internal error.
            raise ServiceError(StatusCodes.BadCertificateUntrusted) from exc
        await self._validator.validate(cert, app)


def _node_id(identifier: str, namespace: int) -> ua.NodeId:
    # asyncua annotates NodeId's fields with its own wrapper types; plain values are right.
    return ua.NodeId(identifier, namespace)  # type: ignore[arg-type]


def _data_value(variant: ua.Variant, stamp: dt.datetime) -> ua.DataValue:
    """A value with source and server timestamp ``stamp`` (asyncua types them as DateTime)."""
    return ua.DataValue(variant, SourceTimestamp=stamp, ServerTimestamp=stamp)  # type: ignore[arg-type]


async def _shutdown(server: Server) -> None:
    """``server.stop()`` without its wait for the clock task, and restartable afterwards."""
    # asyncua's stop() waits up to a second for the task that writes ServerStatus.CurrentTime
    # to finish its sleep, and leaves a flag set that keeps the clock dead after a restart.
    # Cancel the task instead and clear the flag, so stop() is quick and start() works again.
    iserver = server.iserver
    task, iserver.time_task = iserver.time_task, None
    await stop_task(task)
    await server.stop()
    iserver._time_task_stop = False


def _variant(spec: NodeSpec, value: NodeValue) -> ua.Variant:
    if spec.datatype == "LocalizedText":
        return ua.Variant(ua.LocalizedText(str(value)), ua.VariantType.LocalizedText)
    return ua.Variant(value, getattr(ua.VariantType, str(spec.datatype)))


class OpcUaMachineServer:
    """Async context manager serving one simulated machine over OPC UA on ``host:port``."""

    def __init__(
        self,
        model: OpcUaMachineModel,
        *,
        host: str = "127.0.0.1",
        port: int = 4840,
        security: Path | None = None,
        users: Mapping[str, str] | None = None,
        speed: float = 1.0,
        tick: float = 0.1,
        missing: Iterable[str] = (),
        probe: LatencyProbe | None = None,
        plc_sampling: float | None = None,
    ) -> None:
        """Check the set-up; nothing starts before ``async with``.

        ``missing`` lists node keys that are left out of the address space (reads of their
        NodeIds answer BadNodeIdUnknown), for tests of a device that lacks a node.
        ``probe`` turns one String node into the latency probe (see the module docstring).
        ``plc_sampling`` (fastest sampling interval, seconds) samples each monitored item on
        its own timer at the client's sampling interval, like a PLC
        (:mod:`simulators.opcua_sampling`); ``None`` reports changes as they are written.
        """
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be 1..65535, got {port}")
        check_pace(speed, tick)
        if users is not None:
            if not users:
                raise ValueError("users must name at least one user (or be None)")
            for user, password in users.items():
                if not user or not password:
                    raise ValueError("user names and passwords must not be empty")
        space = model.address_space
        keys = {node.key for node in space.nodes}
        unknown = sorted(set(missing) - keys)
        if unknown:
            raise ValueError(f"unknown node keys in missing: {unknown}")
        if probe is not None:
            spec = space.variables().get(probe.key)
            if spec is None or spec.datatype != "String":
                raise ValueError(f"latency probe: {probe.key!r} is not a String variable")
            if probe.key in set(missing):
                raise ValueError(f"latency probe: {probe.key!r} is listed in missing")
        if plc_sampling is not None and not (math.isfinite(plc_sampling) and plc_sampling > 0):
            raise ValueError(f"plc_sampling must be > 0 seconds, got {plc_sampling!r}")
        self.model = model
        self.plc_sampling = plc_sampling
        self.host = host
        self.port = port
        self.security = security
        self.users = dict(users) if users is not None else None
        self.speed = speed
        self.tick = tick
        self.probe = probe
        self._space: AddressSpace = space
        self._specs = space.variables()
        self._removed: set[str] = set(missing)
        self._server: Server | None = None
        self._serving = False
        self._ns: dict[str, int] = {}
        self._nodes: dict[str, Node] = {}
        self._written: dict[str, NodeValue] = {}
        self._task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._probe_last = ""
        self._finished = asyncio.Event()

    # ---- addresses -------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """``opc.tcp://host:port/`` of this server."""
        return f"opc.tcp://{self.host}:{self.port}/"

    @property
    def namespace(self) -> str:
        """Namespace URI of the instance nodes."""
        return self._space.namespace

    def node_id(self, key: str) -> str:
        """NodeId of a node as ``nsu=<namespace>;s=<id>`` ("" = the machine root)."""
        return f"nsu={self._space.namespace};s={self._space.node_id(key)}"

    def is_serving(self) -> bool:
        """True while the listener accepts connections."""
        return self._serving

    # ---- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Build the address space, start listening, then start the tick task."""
        server = await self._build()
        self._server = server
        try:
            await self._listen()
        except BaseException:
            self._server = None
            raise
        self._check_finished()
        offset = self.model.time
        started = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(
            self._run(started, offset), name=f"opcua-sim-tick[{self.model.name}]"
        )
        if self.probe is not None:
            self._probe_task = asyncio.create_task(
                self._run_probe(self.probe), name=f"opcua-sim-probe[{self.model.name}]"
            )
            log.info(
                "opcua simulator latency probe",
                machine=self.model.name,
                node=self.probe.key,
                period=self.probe.period,
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the tick and probe tasks first (nothing writes while the server closes), then it."""
        task, self._task = self._task, None
        probe, self._probe_task = self._probe_task, None
        try:
            try:
                await stop_task(probe)
            finally:
                await stop_task(task)
        finally:
            await self.stop()
            self._server = None

    async def stop(self) -> None:
        """Close the listener and every session; the scenario keeps running."""
        server = self._server
        if server is None or not self._serving:
            return
        self._serving = False
        await _shutdown(server)
        log.info("opcua simulator stopped", machine=self.model.name, endpoint=self.endpoint)

    async def start(self) -> None:
        """Listen again on the same port, with the current values."""
        if self._server is None:
            raise RuntimeError("the server is not running; use it with 'async with'")
        if not self._serving:
            # asyncua appends endpoints and policies on every start; begin afresh.
            self._server.iserver.endpoints.clear()
            self._server._policies.clear()
            await self._listen()

    async def remove_node(self, key: str) -> None:
        """Delete a node (and its children): reads then answer BadNodeIdUnknown."""
        if key not in self._nodes:
            raise KeyError(f"no node {key!r} in the address space (or removed already)")
        server = self._require()
        node = self._nodes[key]
        await server.delete_nodes([node], recursive=True)
        gone = [k for k in self._nodes if k == key or k.startswith(key + "/")]
        for k in gone:
            del self._nodes[k]
            self._removed.add(k)
        log.info("opcua simulator node removed", machine=self.model.name, node=key)

    async def wait_finished(self, timeout: float) -> None:  # noqa: ASYNC109 (same API as the floor)
        """Return once a scripted model ran its script and its nodes show it.

        A generated (endless) scenario never finishes: this raises ``TimeoutError``.
        """
        if self._task is None:
            raise RuntimeError("the server is not running; use it with 'async with'")
        await wait_finished(
            self._finished,
            self._task,
            timeout,
            name="opcua-sim-wait",
            stopped="the simulator stopped before the scenario finished",
        )

    # ---- internals -------------------------------------------------------------------

    def _require(self) -> Server:
        if self._server is None:
            raise RuntimeError("the server is not running; use it with 'async with'")
        return self._server

    async def _build(self) -> Server:
        name = self.model.name
        manager = _PasswordUsers(self.users) if self.users is not None else None
        server = Server(user_manager=manager)
        await server.init()
        if self.plc_sampling is not None:
            sample_like_a_plc(server, self.plc_sampling)
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"Shopfloor simulator {name}")
        await server.set_application_uri(application_uri(name))
        if self.users is not None:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        else:
            server.set_identity_tokens([ua.AnonymousIdentityToken])
        if self.security is not None:
            cert, key = await ensure_certificates(self.security, name)
            await server.load_certificate(str(cert))
            await server.load_private_key(str(key))
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            server.set_certificate_validator(_TrustFolderValidator(trusted_dir(self.security)))
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        await self._populate(server)
        return server

    async def _populate(self, server: Server) -> None:
        space = self._space
        uris = [space.namespace, *sorted({uri for node in space.nodes for uri, _ in node.path})]
        uris.append(space.parent[0])
        for uri in uris:
            if uri not in self._ns:
                self._ns[uri] = await server.register_namespace(uri)
        inst = self._ns[space.namespace]
        parent_ns, parent_name = space.parent
        folder = await server.nodes.objects.add_folder(
            _node_id(parent_name, inst), ua.QualifiedName(parent_name, self._ns[parent_ns])
        )
        root = await folder.add_object(
            _node_id(space.root_id, inst), ua.QualifiedName(self.model.name, inst)
        )
        await root.write_attribute(
            AttributeIds.Description,
            ua.DataValue(
                ua.Variant(ua.LocalizedText(space.root_type), ua.VariantType.LocalizedText)
            ),
        )
        self._nodes = {"": root}
        values = self.model.values()
        wall = time.time()
        now = dt.datetime.fromtimestamp(wall, dt.UTC)
        if self.probe is not None:
            # The probe's first value: a change at start-up, stamped like every later one.
            self._probe_last = probe_value(wall)
            values[self.probe.key] = self._probe_last
        for spec in space.nodes:
            if spec.key in self._removed:
                continue
            parent_key = spec.key.rpartition("/")[0]
            parent = self._nodes.get(parent_key)
            if parent is None:
                # The parent was left out: so are its children.
                self._removed.add(spec.key)
                continue
            uri, browse = spec.path[-1]
            node_id = _node_id(space.node_id(spec.key), inst)
            qname = ua.QualifiedName(browse, self._ns[uri])
            if not spec.is_variable:
                node = await parent.add_object(node_id, qname)
                if spec.event_notifier:
                    await node.write_attribute(
                        AttributeIds.EventNotifier,
                        ua.DataValue(ua.Variant(1, ua.VariantType.Byte)),
                    )
            else:
                value = values.get(spec.key, spec.value)
                assert value is not None  # AddressSpace checks every variable has one
                check_value(spec, value)
                variant = _variant(spec, value)
                if spec.is_property:
                    node = await parent.add_property(node_id, qname, variant)
                else:
                    node = await parent.add_variable(node_id, qname, variant)
                await server.write_attribute_value(node.nodeid, _data_value(variant, now))
                self._written[spec.key] = value
            self._nodes[spec.key] = node

    async def _listen(self) -> None:
        server = self._require()
        try:
            await server.start()
        except OSError as exc:
            with contextlib.suppress(Exception):
                await _shutdown(server)
            raise OSError(
                f"machine {self.model.name}: cannot listen on {self.host}:{self.port} "
                f"(port in use or address not available): {exc}"
            ) from exc
        self._serving = True
        log.info(
            "opcua simulator serving",
            machine=self.model.name,
            endpoint=self.endpoint,
            security="Basic256Sha256 SignAndEncrypt" if self.security else "none",
            users=sorted(self.users) if self.users else "anonymous",
        )

    async def _run(self, started: float, offset: float) -> None:
        async def step(elapsed: float) -> None:
            self.model.advance(offset + elapsed)
            await self._write()
            self._check_finished()

        await run_ticks(started, tick=self.tick, speed=self.speed, step=step)

    async def _write(self) -> None:
        server = self._require()
        values = self.model.values()
        stamp = dt.datetime.now(dt.UTC)
        probe_key = self.probe.key if self.probe is not None else None
        for key, value in values.items():
            if key == probe_key:
                continue  # the probe task owns this node
            if self._written.get(key) == value and type(self._written.get(key)) is type(value):
                continue
            self._written[key] = value
            node = self._nodes.get(key)
            if node is None:
                continue  # removed on purpose
            spec = self._specs[key]
            check_value(spec, value)
            await server.write_attribute_value(
                node.nodeid,
                _data_value(_variant(spec, value), stamp),
            )

    async def _run_probe(self, probe: LatencyProbe) -> None:
        """Write ``L<epoch ms>`` to the probe node at every due change, until cancelled."""
        server = self._require()
        spec = self._specs[probe.key]
        after = time.time()
        while True:
            due = probe.next_change(after)
            await asyncio.sleep(max(0.0, due - time.time()))
            # The loop may wake a hair before ``due``: never take the same change twice.
            after = max(due, time.time())
            node = self._nodes.get(probe.key)
            if node is None:
                continue  # removed on purpose: nothing to change
            # Stamp the instant of the write, not the schedule's: a late wake-up of this
            # loop must not count as delivery latency.
            wall = time.time()
            value = probe_value(wall)
            if value == self._probe_last:
                continue  # a second change within the same millisecond (tiny periods)
            self._probe_last = value
            await server.write_attribute_value(
                node.nodeid,
                _data_value(_variant(spec, value), dt.datetime.fromtimestamp(wall, dt.UTC)),
            )

    def _check_finished(self) -> None:
        if self.model.scripted and self.model.finished:
            self._finished.set()
