"""Deployment files: the systemd unit, container image, compose stack, configs, dashboard.

No container engine runs here, so what the containers would run is run outside them: the
compose gateway config with the same entry point (``shopfloor run -c FILE``) against the
simulators (``shopfloor simulate sewing``) and a Mosquitto using the deploy broker config.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config.influx import InfluxConfig
from gateway.config.listen import parse_listen
from gateway.config.loader import Config, load_config
from tests.brokers import MosquittoBroker, Subscriber, free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "shopfloor.service"
ENTRY = ["run", "-c"]


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) lists (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


# ---------------------------------------------------------------------------- systemd


def test_unit_is_notify_with_watchdog_restart_state_and_hardening() -> None:
    sections = unit_entries(UNIT.read_text())
    service = dict(sections["Service"])
    assert service["Type"] == "notify"
    assert int(service["WatchdogSec"]) >= 10
    assert service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "shopfloor"
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["CapabilityBoundingSet"] == ""  # empty: no capabilities at all
    families = set(service["RestrictAddressFamilies"].split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX"}
    exec_start = service["ExecStart"].split()
    assert exec_start[0].endswith("/shopfloor") and exec_start[1:3] == ENTRY
    assert exec_start[3] == "/etc/shopfloor/gateway.yaml"
    assert dict(sections["Install"])["WantedBy"] == "multi-user.target"


def _verifiable_copy(tmp_path: Path) -> Path:
    # verify checks that ExecStart's binary exists; point it at one that does.
    binary = shutil.which("shopfloor") or str(Path(sys.executable).parent / "shopfloor")
    if not os.access(binary, os.X_OK):
        binary = "/bin/true"
    text = UNIT.read_text().replace("/opt/shopfloor/bin/shopfloor", binary)
    copy = tmp_path / "shopfloor.service"
    copy.write_text(text)
    return copy


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here"
)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    copy = _verifiable_copy(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    # Warnings about the host's other units are not ours; anything naming ours is.
    ours = [line for line in result.stderr.splitlines() if "shopfloor.service" in line]
    assert result.returncode == 0 and not ours, result.stderr


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here"
)
def test_unit_exposure_score_is_low(tmp_path: Path) -> None:
    copy = _verifiable_copy(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (needs systemd >= 250)")
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr
    assert float(match.group(1)) <= 2.5


def test_install_script_is_valid_posix_shell() -> None:
    script = DEPLOY / "install.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["sh", "-n", str(script)], check=True, timeout=30)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-s", "sh", str(script)], check=True, timeout=60)
    text = script.read_text()
    # It installs the unit this suite verifies, and the config this suite loads.
    assert "deploy/systemd/shopfloor.service" in text
    assert "deploy/config/gateway.yaml" in text


def test_install_group_id_is_the_one_the_image_runs_as() -> None:
    # install.sh makes /etc/shopfloor root:shopfloor 0750 and its files 0640; the image's
    # user reads them through the mount only if its group id is that group's.
    script = (DEPLOY / "install.sh").read_text()
    (default_gid,) = re.findall(r"^GID=(\d+)$", script, re.M)
    assert re.search(r"groupadd --system --gid \"\$GID\" shopfloor", script)
    assert "useradd --system --gid shopfloor" in script
    assert re.search(r"install -d -m 0750 -o root -g shopfloor", script)
    inst = containerfile_instructions()
    args = dict(rest.partition("=")[::2] for word, rest in inst if word == "ARG")
    assert args["GID"] == default_gid
    (run,) = [rest for word, rest in inst if word == "RUN" and "groupadd" in rest]
    assert 'groupadd --system --gid "${GID}" shopfloor' in run
    assert "--uid 10001 --gid shopfloor" in run
    assert [rest for word, rest in inst if word == "USER"][-1] == "shopfloor:shopfloor"
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert f"gid {default_gid}" in doc and "--build-arg GID=" in doc


# ---------------------------------------------------------------------------- container


def containerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Containerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_containerfile_slim_non_root_healthcheck_same_entry_point() -> None:
    inst = containerfile_instructions()
    args = dict(rest.partition("=")[::2] for word, rest in inst if word == "ARG")
    froms = [rest for word, rest in inst if word == "FROM"]
    assert froms and all(f.split()[0] == "${BASE}" for f in froms)
    assert "slim" in args["BASE"]
    users = [rest for word, rest in inst if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = [rest for word, rest in inst if word == "HEALTHCHECK"]
    assert health and "/healthz" in health[0]
    entry = json.loads(next(rest for word, rest in inst if word == "ENTRYPOINT"))
    cmd = json.loads(next(rest for word, rest in inst if word == "CMD"))
    assert entry == ["shopfloor"] and cmd[:2] == ENTRY
    # Everything it copies from the repository exists.
    for word, rest in inst:
        if word == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY source missing: {src}"


def test_compose_runs_broker_gateway_simulators_and_a_history_profile() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"mosquitto", "gateway", "simulators"} <= set(services)
    for name in ("mosquitto", "gateway", "simulators"):
        assert "profiles" not in services[name]
    for name in ("victoria-metrics", "grafana"):
        assert services[name]["profiles"] == ["history"]
    gateway = services["gateway"]
    assert gateway["command"][:2] == ENTRY
    configs = re.findall(r"\$\{GATEWAY_CONFIG:-([^}]+)\}", gateway["command"][2])
    assert configs == ["compose.yaml"]
    assert services["simulators"]["command"][:2] == ["simulate", "sewing"]
    # Every bind-mounted file or folder exists.
    for service in services.values():
        for volume in service.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{src} is mounted but missing"
    # The simulator ports are the ones the gateway config reads by default.
    sim = services["simulators"]["command"]
    first = int(sim[sim.index("--port") + 1])
    stations = int(sim[sim.index("--stations") + 1])
    text = (DEPLOY / "config" / "compose.yaml").read_text()
    defaults = sorted(int(p) for p in re.findall(r"SIM_PORT_\d:-(\d+)", text))
    assert defaults == list(range(first, first + stations))


def test_dashboard_queries_only_metrics_the_gateway_writes() -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "shopfloor.json").read_text())
    assert dash["uid"] == "shopfloor"
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        names = re.findall(r"\b((?:shopfloor|process)_[a-z_]+)", expr)
        assert names, expr
        for name in names:
            assert name.startswith(
                (
                    "shopfloor_order_",
                    "shopfloor_machine_",
                    "shopfloor_telemetry_",
                    "shopfloor_gateway_",
                    "shopfloor_device_",
                    "shopfloor_destination_",
                    "shopfloor_events_",
                    "shopfloor_event_delivery_",
                    "process_",
                )
            ), name
    for f in (DEPLOY / "grafana" / "provisioning").rglob("*.yaml"):
        assert yaml.safe_load(f.read_text())["apiVersion"] == 1
    assert yaml.safe_load((DEPLOY / "victoria-metrics" / "scrape.yaml").read_text())


# ---------------------------------------------------------------------------- configs


def _self_signed(directory: Path) -> dict[str, str]:
    """A CA-less self-signed certificate and key, as files the TLS config can name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-hall-a")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (directory / "ca.pem").write_bytes(pem)
    (directory / "gateway.pem").write_bytes(pem)
    (directory / "gateway.key").write_bytes(key_pem)
    return {
        "SHOPFLOOR_CA_FILE": str(directory / "ca.pem"),
        "SHOPFLOOR_CERT_FILE": str(directory / "gateway.pem"),
        "SHOPFLOOR_KEY_FILE": str(directory / "gateway.key"),
    }


PENDING = [key for key in ("health", "influxdb") if key not in Config.model_fields]


def as_loadable_today(path: Path, tmp_path: Path) -> Path:
    """The config itself, or (until the runtime knows them) a copy without new sections.

    The left-out sections are checked with their own models by the callers.
    """
    if not PENDING:
        return path
    data = yaml.safe_load(path.read_text())
    for key in PENDING:
        data.pop(key, None)
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(data, sort_keys=False))
    return copy


def _check_new_sections(path: Path, env: dict[str, str]) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    resolved: dict[str, Any] = {}
    if "health" in data:
        listen = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", data["health"]["listen"])
        resolved["health"] = parse_listen(listen)
    if "influxdb" in data:
        raw = {
            k: re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), str(v))
            if isinstance(v, str)
            else v
            for k, v in data["influxdb"].items()
        }
        resolved["influxdb"] = InfluxConfig.model_validate(raw)
    return resolved


def test_tls_example_config_is_accepted_given_the_files(tmp_path: Path) -> None:
    path = DEPLOY / "config" / "gateway.yaml"
    env = _self_signed(tmp_path) | {"MQTT_PASSWORD": "s3cret", "MQTT_USERNAME": "gw"}
    plan = load_config(as_loadable_today(path, tmp_path), env=env)
    assert plan.broker.tls is not None
    assert plan.broker.tls.ca_file == env["SHOPFLOOR_CA_FILE"]
    assert plan.broker.port == 8883 and plan.broker.username == "gw"
    assert plan.outbox is not None
    assert str(plan.outbox.path).startswith("/var/lib/shopfloor/")
    new = _check_new_sections(path, env)
    assert new["health"] == ("127.0.0.1", 9108)
    assert new["influxdb"].bucket == "shopfloor"


def test_tls_example_config_names_missing_certificates(tmp_path: Path) -> None:
    from gateway.config.loader import ConfigError

    path = DEPLOY / "config" / "gateway.yaml"
    env = {"SHOPFLOOR_CA_FILE": str(tmp_path / "nope.pem")}
    with pytest.raises(ConfigError, match=re.escape("${SHOPFLOOR_CA_FILE}: no such file")) as info:
        load_config(as_loadable_today(path, tmp_path), env=env)
    # A value from the environment is never echoed (it could be a misplaced password).
    assert "nope.pem" not in str(info.value)


@pytest.mark.parametrize("name", ["compose.yaml", "compose-history.yaml"])
def test_compose_configs_load_with_their_defaults(name: str, tmp_path: Path) -> None:
    path = DEPLOY / "config" / name
    plan = load_config(as_loadable_today(path, tmp_path), env={})
    assert plan.outbox is not None
    assert str(plan.outbox.path).startswith("/var/lib/shopfloor/")
    assert [m.id for m in plan.machines] == ["sew-01", "sew-02", "sew-03"]
    new = _check_new_sections(path, {})
    assert new["health"] == ("0.0.0.0", 9108)
    if name == "compose-history.yaml":
        assert new["influxdb"].url == "http://victoria-metrics:8428"


# ---------------------------------------------------------------------------- the stack, run


def _consecutive_free_ports(n: int) -> int:
    for _ in range(50):
        first = free_port()
        socks = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def _deploy_broker_directives() -> str:
    # The deploy broker's settings, minus what must differ on a test machine: the listener
    # (free loopback port), where it stores and where it logs.
    keep = []
    for line in (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        word = line.split(" ", 1)[0]
        if (
            line
            and not line.startswith("#")
            and word
            not in {
                "listener",
                "persistence_location",
                "log_dest",
            }
        ):
            keep.append(line)
    return "\n".join(keep)


@contextlib.asynccontextmanager
async def process(
    args: list[str], env: dict[str, str], log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.integration
async def test_compose_stack_runs_outside_containers(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "mosquitto", extra_config=_deploy_broker_directives())
    broker.start()
    first = _consecutive_free_ports(3)
    health_port = free_port()
    env = {
        "MQTT_HOST": "127.0.0.1",
        "MQTT_PORT": str(broker.port),
        "SIM_HOST": "127.0.0.1",
        "SIM_PORT_1": str(first),
        "SIM_PORT_2": str(first + 1),
        "SIM_PORT_3": str(first + 2),
        "HEALTH_LISTEN": f"127.0.0.1:{health_port}",
        "SHOPFLOOR_STATE_DIR": str(tmp_path / "state"),
    }
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    sim_args = list(compose["services"]["simulators"]["command"])
    sim_args[sim_args.index("--host") + 1] = "127.0.0.1"
    sim_args[sim_args.index("--port") + 1] = str(first)
    config = as_loadable_today(DEPLOY / "config" / "compose.yaml", tmp_path)
    try:
        async with (
            Subscriber(broker.host, broker.port, "shopfloor/#") as sub,
            process(sim_args, env, tmp_path / "sim.log"),
            process([*ENTRY, str(config)], env, tmp_path / "gateway.log") as gw,
        ):

            def all_states(ms: list[Any]) -> bool:
                states = {
                    m.topic.split("/")[-2]: json.loads(m.payload)
                    for m in ms
                    if m.topic.endswith("/state")
                }
                return {k for k, v in states.items() if v["connected"]} == {
                    "sew-01",
                    "sew-02",
                    "sew-03",
                }

            await sub.wait_for(all_states, timeout=20)
            if not PENDING:
                url = f"http://127.0.0.1:{health_port}/healthz"
                with await asyncio.to_thread(urllib.request.urlopen, url, timeout=5) as resp:
                    assert resp.status == 200
            gw.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                assert await gw.wait() == 0
    finally:
        broker.stop()
