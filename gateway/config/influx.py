"""The ``influxdb:`` section: where the optional history sink writes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class InfluxConfig(BaseModel):
    """The ``influxdb:`` section of the gateway config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(min_length=1, description="e.g. http://127.0.0.1:8086")
    org: str = Field(min_length=1)
    bucket: str = Field(min_length=1)
    token: SecretStr | None = None
    batch_size: int = Field(default=1000, ge=1, le=50_000)
    flush_interval: float = Field(default=1.0, gt=0, le=300)
    #: Telemetry lines (one per poll) held in memory while InfluxDB is slow or unreachable;
    #: beyond this or ``max_queue_mib`` the oldest are dropped and counted. Events are not
    #: held here: they wait in the durable outbox and are never dropped for telemetry.
    max_queue: int = Field(default=100_000, ge=100, le=10_000_000)
    #: Memory bound of that telemetry queue, in MiB.
    max_queue_mib: float = Field(default=16.0, ge=0.1, le=4096)
    timeout: float = Field(default=10.0, gt=0, le=300)
    telemetry: bool = True
    #: The order as a tag of the telemetry series (one new series per signal and order:
    #: cardinality grows with every order), instead of the ``order_id`` string field.
    order_tag: bool = False
    ca_file: str | None = None
    verify_tls: bool = True

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # ``${INFLUX_TOKEN:-}`` with the variable unset means "no token".
        return None if value == "" else value
