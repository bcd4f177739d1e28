"""Reload: apply a changed config file to a running gateway, or refuse it and keep the old one."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import TYPE_CHECKING

import structlog

from gateway.config.loader import ConfigError, load_config
from gateway.core.mapping import Mapper
from gateway.core.tracker import MachineTracker

if TYPE_CHECKING:
    from gateway.runtime.gateway import Gateway

log = structlog.get_logger(__name__)

#: Plan fields that cannot change while running (topics and sessions hang on them).
FROZEN_FIELDS = (
    "gateway_id",
    "site",
    "topic_prefix",
    "broker",
    "destinations",
    "sparkplug",
    "outbox",
    "redaction_secret",
)


async def reload(gw: Gateway) -> bool:
    """Apply a changed config file; an invalid one is refused and the old one keeps running.

    Machines added, removed or changed are started, stopped or restarted; untouched ones
    keep running without a gap. A changed machine keeps its tracker, so an order in
    progress continues with its counts. Gateway identity and broker settings cannot
    change at runtime (topics and sessions hang on them): such changes are logged and
    wait for a restart, and the rest of the new config is applied.
    """
    gw.notifier.reloading()
    try:
        new = await asyncio.to_thread(load_config, gw.plan.source)
    except ConfigError as exc:
        gw.notifier.ready(gw.metrics.status_line())
        log.error(
            "config.reload_rejected",
            problems=[str(e) for e in exc.errors],
            detail="the running config stays in force; fix the file and reload again",
        )
        gw.feed.reloaded(gw.clock(), False, [str(e) for e in exc.errors])
        return False
    except Exception as exc:  # an unreadable file must not stop the gateway
        gw.notifier.ready(gw.metrics.status_line())
        log.error("config.reload_rejected", problems=[f"{type(exc).__name__}: {exc}"])
        gw.feed.reloaded(gw.clock(), False, [f"{type(exc).__name__}: {exc}"])
        return False
    frozen = [name for name in FROZEN_FIELDS if getattr(new, name) != getattr(gw.plan, name)]
    if frozen:
        log.warning("config.reload_needs_restart", fields=frozen)
        new = replace(
            new,
            gateway_id=gw.plan.gateway_id,
            site=gw.plan.site,
            topic_prefix=gw.plan.topic_prefix,
            broker=gw.plan.broker,
            destinations=gw.plan.destinations,
            sparkplug=gw.plan.sparkplug,
            outbox=gw.plan.outbox,
            redaction_secret=gw.plan.redaction_secret,
        )
    old = {m.id: m for m in gw.plan.machines}
    fresh = {m.id: m for m in new.machines}
    removed = sorted(old.keys() - fresh.keys())
    added = sorted(fresh.keys() - old.keys())
    changed = sorted(k for k in old.keys() & fresh.keys() if old[k] != fresh[k])
    now = gw.clock()
    for machine in [*removed, *changed]:
        await gw.devices.stop(machine)
    for machine in removed:
        m = gw.machines.pop(machine)
        del gw.locations[machine]
        gw.emitter.emit(m, m.tracker.connection(False, now, "removed from config"))
        for observer in gw.observers:
            observer.removed(machine)
        # An empty retained message deletes the snapshot: late joiners must not see a
        # machine that no longer exists.
        gw.retained.clear(m.plan.id, m.plan.location)
    for machine in changed:
        m = gw.machines[machine]
        plan = fresh[machine]
        if plan.tracker != m.plan.tracker:
            # Rebuilt with new settings while running: nothing went unobserved.
            m.tracker = MachineTracker.restore(
                machine, plan.tracker, m.tracker.export_state(), downtime=False
            )
        if plan.location != m.plan.location:
            gw.retained.clear(machine, m.plan.location)
            gw.locations[machine] = plan.location
        m.plan = plan
        m.refresh_derived()
        m.mapper = Mapper(plan.signals)
        m.problems_logged.clear()
        m.rejections_logged.clear()
        gw.devices.start(m)
    for machine in added:
        plan = fresh[machine]
        m = gw.devices.new_machine(plan)
        gw.machines[machine] = m
        gw.locations[machine] = plan.location
        gw.devices.start(m)
    gw.plan = new
    for observer in gw.observers:
        observer.configure(new)
    gw.metrics.configure(fresh)
    gw.feed.configure(fresh)
    gw.feed.reloaded(now, True, [f"needs a restart: {f}" for f in frozen])
    gw.notifier.ready(gw.metrics.status_line())
    log.info(
        "config.reloaded",
        added=added,
        removed=removed,
        changed=changed,
        unchanged=len(fresh) - len(added) - len(changed),
    )
    return True
