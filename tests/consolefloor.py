"""A simulated floor behind a running gateway with its console, in a background thread.

The browser tests drive Chromium synchronously (Selenium); the stations, the gateway and an
MQTT subscriber run on their own event loop in a thread, and the tests reach them through
:meth:`ConsoleFloor.call`. Also a script: ``python -m tests.consolefloor docs/console``
takes the screenshots of every console page committed to the docs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import sys
import threading
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gateway.config.loader import load_config
from gateway.runtime.gateway import Gateway
from shopfloor_gateway.simulators.modbus_server import SimulatedFloor, StationSpec, free_port
from shopfloor_gateway.simulators.scenario import Fault, Idle, RunOrder, Step
from shopfloor_gateway.simulators.sewing import StationModel
from tests.brokers import MosquittoBroker, Subscriber

T = TypeVar("T")
PREFIX = "console"
SITE = "plant-1"
TOKEN = "console-browser-token-5d1e"

#: sew-01/02 produce steadily (counts visibly move); sew-03 waits for platform orders.
SCRIPTS: dict[str, Sequence[Step] | None] = {
    "sew-01": [Idle(1.0), RunOrder("PO-1001", target=5000, piece_seconds=0.4, scrap_every=7)],
    "sew-02": [
        Idle(1.0),
        RunOrder("PO-2001", target=400, piece_seconds=0.3, pieces=6),
        Fault(4.0, alarm_code=12),
        RunOrder("PO-2001", target=400, piece_seconds=0.3),
    ],
    "sew-03": [Idle(3600.0)],
}


def chromium() -> Any:
    """Headless Debian Chromium through Debian's chromedriver (nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Belt and braces: Selenium Manager, should anything call it, stays offline.
    os.environ.setdefault("SE_OFFLINE", "true")
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    browser = shutil.which("chromium") or "/usr/bin/chromium"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1180,820",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ):
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager is not consulted, so it downloads nothing.
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


class ConsoleFloor:
    """Mosquitto, simulated stations, the gateway with its console, and a subscriber."""

    def __init__(
        self,
        directory: Path,
        scripts: dict[str, Sequence[Step] | None] = SCRIPTS,
        *,
        speed: float = 1.0,
        extra_machines: str = "",
    ) -> None:
        """Nothing runs until :meth:`start`."""
        self.directory = directory
        self.scripts = scripts
        self.speed = speed
        self.extra_machines = extra_machines
        self.broker = MosquittoBroker(directory / "mosquitto")
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.gateway: Gateway | None = None
        self.subscriber: Subscriber | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="console-floor", daemon=True)

    def config(self) -> Path:
        """The gateway config, as a user would write it."""
        lines = [
            f"gateway: {{id: gw-console, site: {SITE}, topic_prefix: {PREFIX}}}",
            f"broker: {{host: 127.0.0.1, port: {self.broker.port}, keepalive: 5}}",
            f"state_dir: {self.directory / 'state'}",
            f"health: {{listen: '127.0.0.1:{self.http_port}', token: '{TOKEN}'}}",
            "logging: {level: warning, format: json}",
            "tracker: {progress_step_percent: 5, progress_interval: 2, rate_min_span: 5}",
            "machines:",
        ]
        self.ports = {name: free_port() for name in self.scripts}
        for i, (name, port) in enumerate(self.ports.items()):
            source = "platform" if name == "sew-03" else "device"
            lines += [
                f"  - id: {name}",
                "    area: sewing",
                f"    line: line-{1 + i % 2}",
                "    profile: sewing-station",
                "    poll_interval: 0.2",
                f"    tracker: {{order_source: {source}}}",
                "    connection: {protocol: modbus, host: 127.0.0.1,"
                f" port: {port}, timeout: 0.5}}",
            ]
        path = self.directory / "gateway.yaml"
        path.write_text("\n".join(lines) + "\n" + self.extra_machines)
        return path

    def start(self) -> None:
        """Start everything; returns once the console answers (bounded)."""
        self.broker.start()
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            self.stop()
            raise RuntimeError(f"console floor did not start: {self._error!r}")

    def stop(self) -> None:
        """Stop the gateway, the stations and the broker (bounded)."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        self.broker.stop()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        """Run a coroutine on the floor's loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        plan = load_config(self.config(), env={})
        stations = [
            StationSpec(name, self.ports[name], StationModel(script, seed=7, name=name))
            for name, script in self.scripts.items()
        ]
        async with (
            Subscriber(self.broker.host, self.broker.port, f"{PREFIX}/#") as sub,
            SimulatedFloor(stations, speed=self.speed),
        ):
            self.subscriber = sub
            gateway = self.gateway = Gateway(plan, shutdown_grace=1.0)
            stop = asyncio.Event()
            task = asyncio.create_task(gateway.run(stop))
            assert gateway.health is not None
            async with asyncio.timeout(20):
                await gateway.health.listening.wait()
            self._ready.set()
            await self._stop.wait()
            stop.set()
            async with asyncio.timeout(15):
                await task


def screenshots(out: Path, seconds: float = 25.0) -> list[Path]:
    """Every console page of a busy simulated floor as PNG files in ``out``."""
    import tempfile
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out.mkdir(parents=True, exist_ok=True)
    # A floor with more going on: generated working days at ten times real speed, and a
    # machine that is not there (its connection history shows why).
    scripts: dict[str, Sequence[Step] | None] = {
        **SCRIPTS,
        **{f"sew-{i:02d}": None for i in range(4, 9)},
    }
    dead = free_port()
    extra = (
        "  - {id: cnc-01, area: machining, line: line-3, profile: sewing-station,"
        f" connection: {{protocol: modbus, host: 127.0.0.1, port: {dead}, timeout: 0.5}}}}\n"
    )
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        floor = ConsoleFloor(Path(tmp), scripts, speed=10.0, extra_machines=extra)
        floor.start()
        driver = chromium()
        try:
            driver.set_window_size(1180, 820)  # a 10-inch tablet, landscape
            driver.get(floor.url + "/")
            time.sleep(seconds)  # let the floor fill with orders, progress and events
            driver.get(floor.url + "/machines/sew-03")
            WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "form-assign-order"))
            form = driver.find_element(By.ID, "form-assign-order")
            form.find_element(By.NAME, "order_id").send_keys("SO-4711")
            form.find_element(By.NAME, "target").send_keys("40")
            form.find_element(By.NAME, "token").send_keys(TOKEN)
            form.submit()
            WebDriverWait(driver, 10).until(
                lambda d: "accepted" in d.find_element(By.CSS_SELECTOR, "[data-answer]").text
            )
            pages = {
                "floor": "/",
                "machine": "/machines/sew-02",
                "orders": "/orders",
                "deliveries": "/deliveries",
                "config": "/config",
            }
            for name, path in pages.items():
                driver.get(floor.url + path)
                WebDriverWait(driver, 10).until(
                    lambda d: "Loading" not in d.find_element(By.ID, "main").text
                )
                time.sleep(1.0)  # one live update drawn
                # The whole page, not just the window.
                shot = driver.execute_cdp_cmd(
                    "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
                )
                target = out / f"{name}.png"
                target.write_bytes(base64.b64decode(shot["data"]))
                written.append(target)
        finally:
            driver.quit()
            floor.stop()
    return written


@contextlib.contextmanager
def running(directory: Path) -> Iterator[ConsoleFloor]:
    """A started :class:`ConsoleFloor`, stopped afterwards."""
    floor = ConsoleFloor(directory)
    floor.start()
    try:
        yield floor
    finally:
        floor.stop()


if __name__ == "__main__":
    for path in screenshots(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/console")):
        print(path)
