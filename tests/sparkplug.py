"""Test helpers for Sparkplug B: Eclipse Tahu's own decoder, run by Node.js."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path
from typing import Any

JS_DIR = Path(__file__).resolve().parent / "sparkplug_js"


class DecoderMissingError(RuntimeError):
    """Node.js or the pinned npm packages are not installed."""


def _node() -> str:
    node = shutil.which("node")
    if node is None or not (JS_DIR / "node_modules" / "sparkplug-payload").is_dir():
        raise DecoderMissingError(
            "the Sparkplug B tests decode with Eclipse Tahu's sparkplug-payload (npm): "
            "run `make sparkplug-js` (installs nodejs/npm if needed, then npm ci)"
        )
    return node


async def _run(data: bytes, *args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        _node(),
        str(JS_DIR / "decode.js"),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate(data)
    if proc.returncode != 0:
        raise RuntimeError(f"Tahu codec failed ({proc.returncode}): {err.decode()}")
    return out


async def tahu_decode(payloads: list[bytes]) -> list[dict[str, Any]]:
    """Decode Sparkplug B payloads with Tahu's JavaScript codec (64-bit ints exact)."""
    out = await _run(json.dumps([base64.b64encode(p).decode() for p in payloads]).encode())
    decoded: list[dict[str, Any]] = json.loads(out)
    return decoded


async def tahu_encode(payload: dict[str, Any]) -> bytes:
    """Encode one payload (Tahu's object form) with Tahu's JavaScript codec."""
    out = await _run(json.dumps([payload]).encode(), "encode")
    return base64.b64decode(json.loads(out)[0])


def by_name(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A decoded BIRTH's metrics by name."""
    return {m["name"]: m for m in payload["metrics"]}
