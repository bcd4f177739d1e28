"""Fuzz: the config loader on generated YAML text and mutated config structures.

``load_config`` must return a plan or raise :class:`ConfigError` (file, line, message), for
any input; and any identifier that becomes a topic segment with ``+``, ``#``, ``/``, NUL,
nothing or too much in it is refused.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.config.loader import ConfigError, GatewayPlan, load_config
from tests.fuzz import fuzz

BASE: dict[str, Any] = {
    "gateway": {"id": "gw-1", "site": "plant-1", "topic_prefix": "shopfloor"},
    "broker": {"host": "127.0.0.1", "port": 1883, "username": "u", "password": "${PW:-x}"},
    "machines": [
        {
            "id": "sew-01",
            "area": "sewing",
            "line": "line-1",
            "profile": "sewing-station",
            "connection": {"protocol": "modbus", "host": "127.0.0.1", "port": 5020},
        }
    ],
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from(["${PW}", "$${X}", "${UNSET_VAR_Z}", "0x10", "1e999", "\x00", "a/b", "#"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _load_text(text: str) -> GatewayPlan | None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "gw.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            return load_config(path, env={"PW": "pw"})
        except ConfigError as exc:
            assert exc.errors, "a ConfigError names at least one problem"
            for err in exc.errors:
                assert str(err)
            return None


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


# Surrogates cannot be written to a UTF-8 file; every other character can.
yaml_text = st.text(
    st.characters(blacklist_categories=("Cs",)) | st.sampled_from("\n\t :-[]{}&*!|>'\"#,"),
    max_size=300,
)


@fuzz(40)
@given(yaml_text)
@example("a: !!python/object/apply:os.system ['true']\n")
@example("gateway: &a [*a]\n")
@example("\x1f")
@example("gateway: {id: x}\ngateway: {id: y}\n")
@example("- 1\n- 2\n")
@example("\ufeffgateway: 1\n")
def test_arbitrary_text_is_a_plan_or_a_config_error(text: str) -> None:
    _load_text(text)


@fuzz(60)
@given(st.data())
def test_mutated_configs_are_a_plan_or_a_config_error(data: st.DataObject) -> None:
    doc = copy.deepcopy(BASE)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(doc)[1:]))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=10))] = data.draw(values)
        else:
            parent[path[-1]] = data.draw(values)
    _load_text(yaml.safe_dump(doc, allow_unicode=True))


bad_ids = st.one_of(
    st.sampled_from(["", "a+b", "a#", "a/b", "a\x00b", "+", "#", "x" * 65, " lead", "-x"]),
    st.text(min_size=1, max_size=10).map(lambda t: t + "/x"),
    st.text(min_size=1, max_size=10).map(lambda t: "x+" + t),
)
fields = st.sampled_from(
    [
        ("gateway", "id"),
        ("gateway", "site"),
        ("machines", 0, "id"),
        ("machines", 0, "area"),
        ("machines", 0, "line"),
        ("machines", 0, "site"),
    ]
)


@fuzz(60)
@given(fields, bad_ids)
def test_identifiers_that_become_topic_segments_are_checked(
    field: tuple[Any, ...], value: str
) -> None:
    doc = copy.deepcopy(BASE)
    parent: Any = doc
    for key in field[:-1]:
        parent = parent[key]
    parent[field[-1]] = value
    assert _load_text(yaml.safe_dump(doc)) is None, f"{field}={value!r} was accepted"


@fuzz(30)
@given(st.sampled_from(["", "a/+", "a//b", "/a", "a/#", "a/\x00", "x" * 65]))
def test_topic_prefix_segments_are_checked(prefix: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["gateway"]["topic_prefix"] = prefix
    assert _load_text(yaml.safe_dump(doc)) is None


def test_the_base_config_is_valid() -> None:
    plan = _load_text(yaml.safe_dump(BASE))
    assert plan is not None and plan.machines[0].id == "sew-01"
