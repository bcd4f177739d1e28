"""PLC-like sampling for the OPC UA simulators: a monitored item sees a value at its own ticks.

The asyncua server reports a value change the moment it is written, whatever sampling
interval the client asked for, and revises every sampling interval to the publishing
interval without acting on it. A PLC's OPC UA server instead samples each monitored item
on a timer at the (revised) sampling interval: a change waits for the item's next sample,
then for the next publish. :func:`sample_like_a_plc` makes one simulated server behave so:
each data-change item of that server gets a timer of ``max(requested, fastest)`` seconds
(``-1``, the client's "use the publishing interval", takes the publishing interval) started
when the item is created, and a written value reaches the item's queue only at its next tick
(the last value written before the tick, as a sampler would read it). The first value is
sampled at creation, as before. Other servers in the process are not affected.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from dataclasses import dataclass

from asyncua import ua
from asyncua.server import internal_subscription
from asyncua.server.address_space import AddressSpace
from asyncua.server.monitored_item_service import MonitoredItemService
from asyncua.server.server import Server

#: Fastest sampling interval (seconds) of each server that samples like a PLC.
_FASTEST: weakref.WeakKeyDictionary[AddressSpace, float] = weakref.WeakKeyDictionary()


@dataclass(slots=True)
class _Sampler:
    """One monitored item's sampling timer and the value its next sample will read."""

    interval: float
    origin: float
    latest: ua.DataValue | None = None
    task: asyncio.Task[None] | None = None

    def next_tick(self, now: float) -> float:
        """The first sampling instant at or after ``now`` (loop time)."""
        return self.origin + math.ceil((now - self.origin) / self.interval) * self.interval


class _SampledItems(MonitoredItemService):
    """Monitored items that sample on timers when their server is registered (else as before)."""

    def __init__(self, isub: internal_subscription.InternalSubscription, aspace: AddressSpace):
        super().__init__(isub, aspace)
        self._samplers: dict[int, _Sampler] = {}

    async def _create_data_change_monitored_item(
        self, params: ua.MonitoredItemCreateRequest
    ) -> ua.MonitoredItemCreateResult:
        result = await super()._create_data_change_monitored_item(params)
        fastest = _FASTEST.get(self.aspace)
        if fastest is None or not result.StatusCode.is_good():
            return result
        requested = float(params.RequestedParameters.SamplingInterval)
        if requested < 0:
            requested = float(self.isub.data.RevisedPublishingInterval)
        interval_ms = max(requested, fastest * 1000)
        result.RevisedSamplingInterval = interval_ms
        handle = self._monitored_items[result.MonitoredItemId].callback_handle
        if handle is not None:
            loop = asyncio.get_running_loop()
            self._samplers[handle] = _Sampler(interval_ms / 1000, loop.time())
        return result

    async def datachange_callback(
        self, handle: int, value: ua.DataValue, error: ua.StatusCode | None = None
    ) -> None:
        sampler = self._samplers.get(handle)
        if error or sampler is None:
            await super().datachange_callback(handle, value, error)
            return
        # The write lands in the PLC's memory; the item sees it at its next sample.
        sampler.latest = value
        if sampler.task is None:
            at = sampler.next_tick(asyncio.get_running_loop().time())
            sampler.task = asyncio.create_task(self._sample_at(handle, sampler, at))

    async def _sample_at(self, handle: int, sampler: _Sampler, at: float) -> None:
        await asyncio.sleep(max(0.0, at - asyncio.get_running_loop().time()))
        sampler.task = None
        value, sampler.latest = sampler.latest, None
        if value is not None and handle in self._monitored_datachange:
            await super().datachange_callback(handle, value)

    def _delete_monitored_items(self, mid: int) -> ua.StatusCode:
        mdata = self._monitored_items.get(mid)
        status = super()._delete_monitored_items(mid)
        handle = None if mdata is None else mdata.callback_handle
        sampler = self._samplers.pop(handle, None) if handle is not None else None
        if sampler is not None and sampler.task is not None:
            sampler.task.cancel()
        return status


def sample_like_a_plc(server: Server, fastest: float) -> None:
    """Make ``server`` sample each monitored item on its own timer (fastest ``fastest`` s)."""
    if not (math.isfinite(fastest) and fastest > 0):
        raise ValueError(f"the fastest sampling interval must be > 0 seconds, got {fastest!r}")
    _FASTEST[server.iserver.aspace] = fastest
    # Subscriptions build their item service by this module-level name; the subclass acts
    # only for registered servers, so one installed for all is harmless to the others.
    internal_subscription.MonitoredItemService = _SampledItems  # type: ignore[attr-defined,misc]
