"""A short chaos campaign (about two minutes) in `make test`: every invariant must hold.

The long campaign (`make chaos`, tests/chaos/README.md) draws faults at random; this one
goes through a fixed subset in turn with a fixed seed, one fault per episode, so each run
exercises the same faults: process kills and stops, a broker outage, device cuts and stalls,
a full disk, the hostile platform's squatted command ids, guessed order ids and queue flood,
a command flood and a slow history sink.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAULTS = [
    "gateway_sigkill",
    "hostile_squat",
    "device_cut",
    "hostile_guess",
    "broker_outage",
    "gateway_sigterm",
    "hostile_queue_flood",
    "disk_full",
    "device_stall",
    "command_flood",
    "slow_history",
]


@pytest.mark.skipif(os.geteuid() != 0, reason="the full-disk fault mounts a tmpfs: needs root")
def test_short_campaign_keeps_every_promise(tmp_path: Path) -> None:
    report_path = tmp_path / "chaos.json"
    cmd = [
        sys.executable,
        "-m",
        "tests.chaos.campaign",
        "--seed",
        "11",
        "--episodes",
        str(len(FAULTS)),
        "--episode-seconds",
        "8",
        "--settle-seconds",
        "20",
        "--cycle",
        "--faults",
        ",".join(FAULTS),
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(report_path),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert report_path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    drawn = set(report["faults_drawn"])
    assert drawn == set(FAULTS), f"faults not exercised: {set(FAULTS) - drawn}"
    assert report["episodes_run"] >= len(FAULTS)
    assert report["stats"]["unique_events"] > 50, report["stats"]
    harness = [f for ep in report["episodes"] for f in ep["faults"] if "harness_error" in f]
    assert not harness, harness
    broken = [
        f"[{v['invariant']}] episode {v['episode']}: {v['what']}\n"
        f"  {json.dumps(v['evidence'])[:700]}"
        for v in report["violations"]
    ]
    assert not broken, (
        f"{len(broken)} violation(s); reproduce: {report['reproduce']}\n" + "\n".join(broken)
    )
    assert done.returncode == 0, done.stdout[-2000:]
