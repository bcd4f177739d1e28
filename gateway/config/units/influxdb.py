"""The ``influxdb:`` section: the optional history sink's settings, checked once more."""

from __future__ import annotations

from gateway.config.influx import InfluxConfig
from gateway.config.units.context import Unit
from gateway.config.yamlsource import strip_url_credentials


def compile_influxdb(unit: Unit) -> InfluxConfig | None:
    """The section as validated (``None``: off); credentials in the url are an error."""
    influx = unit.config.influxdb
    if influx is not None and strip_url_credentials(influx.url) != influx.url:
        unit.error(
            ("influxdb", "url"),
            "put credentials in 'token' (for InfluxDB 1.x: 'user:password'), "
            "not in the url: the url is logged",
        )
    return influx
