"""The seed's diff rules (`fleetlog.compute_diff_fields`), each edge case on its own; pure functions."""

from __future__ import annotations

from typing import Any

import pytest
from fleetlog.schemas.snapshots import diff_changes

from fleetlog import compute_diff_fields


@pytest.mark.parametrize("prev, latest, fields", [
    (None, {"a": 1, "b": {"c": 2}}, []),  # the first snapshot: no diff
    ({"a": 1}, {"a": 1}, []),
    ({"timestamp": "t1", "a": 1}, {"timestamp": "t2", "a": 1}, []),  # the top-level timestamp is skipped
    ({"x": {"timestamp": "t1"}}, {"x": {"timestamp": "t2"}}, ["x.timestamp"]),  # a nested one counts
    ({"a": None}, {}, []),  # missing on one side, None on the other: no change
    ({}, {"a": None}, []),
    ({"a": 0}, {}, ["a"]),  # missing vs a value that is not None: a change
    ({"d": {}}, {}, []),  # an empty nested dict contributes no key
    ({"d": {}}, {"d": {"k": 1}}, ["d.k"]),
    ({"l": [1, 2]}, {"l": [2, 1]}, ["l"]),  # lists are whole values, never exploded
    ({"l": [1, {"a": 1}]}, {"l": [1, {"a": 2}]}, ["l"]),
    ({"a": 1}, {"a": 1.0}, []),  # Python equality: 1 == 1.0 == True
    ({"a": 1}, {"a": True}, []),
    ({"a": 1}, {"a": 2.0}, ["a"]),
    ({"pids": {"tmux": {"server": 1, "pane": 2}}}, {"pids": {"tmux": {"server": 3, "pane": 2}}},
     ["pids.tmux.server"]),  # dotted keys
    ({"d": {"x": 1}}, {"d": 5}, ["d", "d.x"]),  # a dict became a scalar
    ({"z": 1, "b": 1, "a": {"y": 1}}, {"z": 2, "b": 2, "a": {"y": 2}}, ["a.y", "b", "z"]),  # sorted ascending
])
def test_compute_diff_fields(prev: dict[str, Any] | None, latest: dict[str, Any], fields: list[str]) -> None:
    assert compute_diff_fields(prev, latest) == fields
    assert sorted(diff_changes(prev, latest)) == fields


def test_changes_name_both_sides() -> None:
    assert diff_changes({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}}) == {
        "a.b": {"from": 1, "to": 2}, "c": {"from": 2, "to": None}}
