"""The gateway's metric names in the docs and the dashboard are the ones it exports.

A renamed metric (``destination_backlog`` became ``destination_backlog_messages``) leaves
alerts and troubleshooting tables that query nothing. The exported names are the list in
:mod:`gateway.runtime.metrics`, checked against a real exposition; names of the history sink's
series (``shopfloor_order_good``, ``shopfloor_machine_state_code`` ...) are not /metrics
names and are left alone.
"""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

import gateway.runtime.metrics
from gateway.runtime.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")),
]
HISTOGRAM = ("_bucket", "_sum", "_count")


def exported() -> set[str]:
    """The names listed under "Exported" in the metrics module, with their prefix."""
    doc = gateway.runtime.metrics.__doc__ or ""
    listing = doc.split("Exported (all prefixed ``shopfloor_``)::", 1)[1].split("plus ", 1)[0]
    return {f"shopfloor_{m}" for m in re.findall(r"^    ([a-z_]+)", listing, re.MULTILINE)}


def test_the_listed_names_are_the_exported_families() -> None:
    m = Metrics(gateway_id="gw-1", started_at=900.0, version="1")
    m.configure(["sew-01"])
    m.destination_state("default", connected=True, backlog=1, oldest_age=1.0)
    listed = exported()
    shown = {
        s.name
        for f in text_string_to_metric_families(m.render().decode())
        for s in f.samples
        if s.name.startswith("shopfloor_")
    }
    unlisted = {
        n
        for n in shown
        if n not in listed and not any(n.removesuffix(x) in listed for x in HISTOGRAM)
    }
    assert len(shown) > 10 and not unlisted, unlisted


def test_docs_and_dashboards_name_only_exported_metrics() -> None:
    names = exported()
    families = {n.split("_")[1] for n in names}
    wrong = []
    for path in DOCUMENTS:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            # A name followed by a dot is a module or entry-point group, not a metric.
            for name in re.findall(r"\bshopfloor_[a-z_]+[a-z](?![.\w])", line):
                if name.split("_")[1] not in families:
                    continue  # a history series, not a /metrics name
                base = next((name.removesuffix(s) for s in HISTOGRAM if name.endswith(s)), name)
                if name not in names and base not in names:
                    wrong.append(f"{path.relative_to(ROOT)}:{n}: {name}")
    assert not wrong, wrong
