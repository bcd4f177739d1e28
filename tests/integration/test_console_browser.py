"""The web console in a real headless Chromium, against the running gateway and simulators.

One browser and one simulated floor (real Modbus stations over TCP, real Mosquitto, the
gateway with its console) are shared by the module. The browser is Debian's ``chromium``
driven through Debian's ``chromium-driver`` by Selenium (``make test`` installs both).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import Received
from tests.consolefloor import PREFIX, TOKEN, ConsoleFloor, chromium

pytestmark = pytest.mark.integration

if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
    pytest.fail(
        "the console's browser tests need Debian's chromium and chromium-driver: run "
        "`make test` (it installs them) or `apt-get install chromium chromium-driver`",
        pytrace=False,
    )

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def floor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleFloor]:
    f = ConsoleFloor(tmp_path_factory.mktemp("console"))
    f.start()
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, what: Any, timeout: float = 15.0) -> Any:
    """Until ``what(driver)`` is truthy (stale elements are retried)."""
    return WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    ).until(what)


def field(driver: Any, machine: str, name: str) -> str:
    card = driver.find_element(By.ID, f"m-{machine}")
    text: str = card.find_element(By.CSS_SELECTOR, f"[data-field={name}]").text
    return text


def test_the_floor_page_shows_every_machine_by_area_and_line(
    floor: ConsoleFloor, browser: Any
) -> None:
    browser.get(floor.url + "/")
    wait(browser, lambda d: d.find_elements(By.ID, "m-sew-03"))
    headings = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#floor h2")]
    assert headings == ["sewing / line-1", "sewing / line-2"]
    wait(browser, lambda d: field(d, "sew-01", "connection") == "connected")
    wait(browser, lambda d: field(d, "sew-01", "order") == "PO-1001")
    wait(browser, lambda d: d.find_element(By.ID, "live").get_attribute("class") == "live on")
    # The filter hides what does not match, without asking the server.
    box = browser.find_element(By.CSS_SELECTOR, "input[type=search]")
    box.send_keys("PO-1001")
    wait(
        browser,
        lambda d: (
            [c.get_attribute("data-machine") for c in d.find_elements(By.CSS_SELECTOR, ".card")]
            == ["sew-01"]
        ),
    )


def test_counts_change_live_without_a_reload(floor: ConsoleFloor, browser: Any) -> None:
    browser.get(floor.url + "/")
    wait(browser, lambda d: field(d, "sew-01", "good").isdigit())
    browser.execute_script("window.sameDocument = true")
    first = int(field(browser, "sew-01", "good"))
    wait(browser, lambda d: int(field(d, "sew-01", "good")) >= first + 2)
    assert browser.execute_script("return window.sameDocument") is True


def test_links_lead_to_a_machine_and_to_a_destination(floor: ConsoleFloor, browser: Any) -> None:
    browser.get(floor.url + "/")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#m-sew-01 a.id"))
    browser.find_element(By.CSS_SELECTOR, "#m-sew-01 a.id").click()
    wait(browser, lambda d: d.current_url.endswith("/machines/sew-01"))
    row = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-signal=good_count]"))
    assert row[0].find_elements(By.TAG_NAME, "td")[2].text == "good"
    history = browser.find_element(By.ID, "connections").text
    assert "up" in history and "connected" in history
    browser.back()
    link = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "a[data-destination=default]"))
    link[0].click()
    wait(browser, lambda d: d.current_url.endswith("/deliveries#d-default"))
    row = wait(browser, lambda d: d.find_elements(By.ID, "d-default"))[0]
    wait(browser, lambda d: "connected" in d.find_element(By.ID, "d-default").text)
    assert "destination" in row.text


def submit(browser: Any, floor: ConsoleFloor, order_id: str, token: str | None) -> str:
    browser.get(floor.url + "/machines/sew-03")
    form = wait(browser, lambda d: d.find_elements(By.ID, "form-assign-order"))[0]
    form.find_element(By.NAME, "order_id").send_keys(order_id)
    form.find_element(By.NAME, "target").send_keys("25")
    if token is not None:
        form.find_element(By.NAME, "token").send_keys(token)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    answer = browser.find_element(By.CSS_SELECTOR, "[data-answer=assign-order]")
    wait(browser, lambda d: answer.text)
    text: str = answer.text
    return text


def started(order_id: str) -> Any:
    def pred(ms: list[Received]) -> bool:
        return any(
            m.topic.endswith("/event/order.started")
            and json.loads(m.payload)["data"]["order_id"] == order_id
            for m in ms
        )

    return pred


def test_an_order_assigned_with_the_token_shows_on_the_page_and_on_mqtt(
    floor: ConsoleFloor, browser: Any
) -> None:
    answer = submit(browser, floor, "WEB-1", TOKEN)
    assert answer.startswith("accepted (HTTP 200)")
    wait(browser, lambda d: field(d, "sew-03", "order") == "WEB-1")
    assert floor.subscriber is not None
    messages = floor.call(floor.subscriber.wait_for(started("WEB-1"), timeout=10))
    event = next(m for m in messages if started("WEB-1")([m]))
    assert event.topic == f"{PREFIX}/plant-1/sewing/line-1/sew-03/event/order.started"


def test_the_same_order_without_the_token_is_refused(floor: ConsoleFloor, browser: Any) -> None:
    answer = submit(browser, floor, "WEB-2", None)
    assert answer.startswith("refused (HTTP 401)")
    assert "Authorization: Bearer" in answer
    wrong = submit(browser, floor, "WEB-2", "not-the-token")
    assert wrong.startswith("refused (HTTP 401)")
    assert floor.gateway is not None
    snapshot = floor.gateway.snapshot("sew-03")
    assert snapshot is not None and all(
        q[0] != "WEB-2" for q in floor.gateway.queued_orders("sew-03")
    )
    assert (snapshot.get("order") or {}).get("order_id") != "WEB-2"
    assert floor.subscriber is not None
    assert not started("WEB-2")(floor.subscriber.messages)


def test_the_config_page_shows_the_last_reload_and_no_secret(
    floor: ConsoleFloor, browser: Any
) -> None:
    gw = floor.gateway
    assert gw is not None
    path = Path(gw.plan.source)
    good = path.read_text()
    path.write_text(good.replace("poll_interval: 0.2", "poll_interval: fast", 1))
    try:
        assert floor.call(gw.reload()) is False
        browser.get(floor.url + "/config")
        wait(browser, lambda d: "refused" in d.find_element(By.ID, "reload").text)
        assert "poll_interval" in browser.find_element(By.ID, "reload-problems").text
    finally:
        path.write_text(good)
    assert floor.call(gw.reload()) is True
    browser.refresh()
    wait(browser, lambda d: "applied" in d.find_element(By.ID, "reload").text)
    config = browser.find_element(By.ID, "config").text
    assert '"token": "***"' in config and TOKEN not in browser.page_source


def test_every_page_loads_without_an_error(
    tmp_path: Path, floor: ConsoleFloor, browser: Any
) -> None:
    browser.get_log("browser")  # what earlier tests caused (their refused commands)
    for path in ("/", "/machines/sew-02", "/orders", "/deliveries", "/config"):
        browser.get(floor.url + path)
        wait(browser, lambda d: "Loading" not in d.find_element(By.ID, "main").text)
        errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
        assert errors == [], errors
        target = tmp_path / (path.strip("/").replace("/", "-") or "floor")
        assert browser.save_screenshot(str(target.with_suffix(".png")))
