"""Generated bad input for the per-family tests (tests/test_bad_input_*.py).

A family gives a factory of valid events (each one row of its view, found by a key) and
the names of its required fields by kind. `draw_cases` turns a hypothesis-drawn plan into
(subject, payload, expectation) cases, and `run_family` publishes them with a raw nats-py
client (not our SDK), valid and bad interleaved, then checks: every valid event is in the
view exactly once, every bad one is in rejects with a reason naming what was wrong, the
projector is still live, and a rebuild answers the same rows as the live view.

Hypothesis draws the cases (`collect`) and the test publishes them all against one broker:
a broker and server per example would cost seconds each on this 2-core machine. A failing
assertion names the case (kind, field, the reason the fold gave).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats
from fleetlog.schemas import decode_event, encode_event
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fleetlog import Fleet

from .helpers import rebuild_and_wait, wait_until

OVERSIZE = 600_000  # > max_event_bytes (512 KiB), < the broker's max_payload (1 MiB)
WRONG_FOR_STR: list[Any] = [7, -1.5, True, [], {"x": 1}, None, ["a"]]
WRONG_FOR_NUM: list[Any] = ["slow", "", True, [], {"n": 1}, None, [1.0]]
WRONG_FOR_INT: list[Any] = ["3", 1.5, True, [], {"n": 1}, None]
BAD_TS = ["yesterday at noon", "2026-13-45T00:00:00", "1999-02-30T10:00:00", "12:00 tomorrow",
          "0000-00-00T00:00:00", "2026-01-01T25:61:00+00:00"]
# Odd but ISO-8601: a fact with a strange clock is still a fact; it must land, once.
FAR_TS = ["0001-01-01T00:00:00+00:00", "1900-01-01T00:00:00", "9999-12-31T23:59:59.999999+00:00",
          "2200-06-01T12:00:00-11:00"]
ODD_TOKENS = ["%2A", "%3E", "%2E", "%41", "a%20b", "ü", "%%", "__", "-", "~"]


@dataclass
class Family:
    projection: str
    stream: str
    table: str
    key_sql: str  # the key expression of one view row, as text
    valid: Callable[[int, str], msgspec.Struct]  # (i, ts) -> an event that is row `key(event)`
    key: Callable[[msgspec.Struct], str]
    strings: tuple[str, ...]  # required string fields (top level)
    numbers: tuple[str, ...] = ()  # required non-negative float fields
    ints: tuple[str, ...] = ()
    free: str | None = None  # a free-form dict field (deep nesting, oversize go there)
    subject_token: int = 2  # the subject token that carries the identity an odd token replaces
    dup_field: str | None = None  # a body field a duplicate id may change (append-only views)
    dup_sql: str | None = None  # that field's column, as text

    def key_of_payload(self, case: Case) -> str | None:
        """The view key a payload would have, if it decodes at all (diagnostics only)."""
        try:
            return self.key(decode_event(case.payload))
        except Exception:
            return None


@dataclass
class Case:
    kind: str
    subject: str
    payload: bytes
    valid: bool
    words: tuple[str, ...] = ()  # one of them must be in the reject reason
    key: str | None = None
    first_value: str | None = None  # a duplicate: the view keeps the first body's value
    seq: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _body(event: msgspec.Struct) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(encode_event(event))
    return out


def _bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


def _deep(depth: int) -> Any:
    node: Any = 1
    for _ in range(depth):
        node = [node]
    return node


KINDS = ("not_json", "missing", "wrong_type", "negative", "huge", "nan", "deep", "bad_utf8", "oversize",
         "odd_subject", "bad_ts", "wrong_family", "far_ts", "dup", "extra_field", "valid")
# An example is a shuffled run of distinct kinds (at least 4): every kind comes up often, in any order.
PLAN = st.tuples(st.permutations(KINDS), st.integers(min_value=4, max_value=len(KINDS))).map(
    lambda p: list(p[0][:p[1]]))


def draw_cases(family: Family, n_examples: int, start: int = 0) -> list[list[tuple[str, Any]]]:
    """Hypothesis draws `n_examples` plans: each a list of (kind, parameter)."""
    plans: list[list[tuple[str, Any]]] = []

    @settings(max_examples=n_examples, database=None, phases=[Phase.generate], deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(kinds=PLAN, data=st.data())
    def collect(kinds: list[str], data: st.DataObject) -> None:
        plan: list[tuple[str, Any]] = []
        for kind in kinds:
            param: Any = None
            if kind == "not_json":
                param = data.draw(st.binary(min_size=1, max_size=64).filter(lambda b: not _is_json(b)))
            elif kind in ("missing",):
                param = data.draw(st.sampled_from(["id", "ts", "type", *family.strings, *family.numbers,
                                                   *family.ints]))
            elif kind == "wrong_type":
                fields = [*family.strings, *family.numbers, *family.ints, "id", "ts"]
                name = data.draw(st.sampled_from(fields))
                pool = (WRONG_FOR_NUM if name in family.numbers else
                        WRONG_FOR_INT if name in family.ints else WRONG_FOR_STR)
                param = (name, data.draw(st.sampled_from(pool)))
            elif kind == "negative":
                if not family.numbers:
                    kind, param = "bad_ts", data.draw(st.sampled_from(BAD_TS))
                else:
                    param = (data.draw(st.sampled_from(family.numbers)),
                             data.draw(st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)))
            elif kind == "huge":
                param = data.draw(st.sampled_from(["1e999", "-1e999", str(2**70), str(-(2**70))]))
            elif kind == "nan":
                param = data.draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", "inf"]))
            elif kind == "deep":
                param = data.draw(st.integers(min_value=2_000, max_value=20_000))
            elif kind == "bad_utf8":
                param = (data.draw(st.sampled_from(family.strings or ("ts",))),
                         data.draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                                                    b"\x80abc"])))
            elif kind == "odd_subject":
                param = data.draw(st.sampled_from(ODD_TOKENS))
            elif kind == "bad_ts":
                param = data.draw(st.sampled_from(BAD_TS))
            elif kind == "far_ts":
                param = data.draw(st.sampled_from(FAR_TS))
            elif kind == "extra_field":
                param = data.draw(st.dictionaries(st.text(min_size=1, max_size=8).map(lambda s: "x_" + s),
                                                  st.integers() | st.text(max_size=10), min_size=1, max_size=3))
            plan.append((kind, param))
        plans.append(plan)

    collect()
    return plans


def _is_json(b: bytes) -> bool:
    try:
        json.loads(b)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


class Builder:
    """Turns plans into cases, numbering valid events so that each is its own view row."""

    def __init__(self, family: Family, ts: str) -> None:
        self.family = family
        self.ts = ts
        self.i = 0
        self.published: list[msgspec.Struct] = []  # valid events a duplicate can reuse the id of

    def _next(self, ts: str | None = None) -> msgspec.Struct:
        self.i += 1
        return self.family.valid(self.i, ts or self.ts)

    def _valid(self, event: msgspec.Struct, kind: str = "valid") -> Case:
        self.published.append(event)
        subject = event.subject()  # type: ignore[attr-defined]
        return Case(kind, subject, encode_event(event), True, key=self.family.key(event))

    def build(self, kind: str, param: Any) -> Case:
        f = self.family
        if kind == "valid":
            return self._valid(self._next())
        if kind == "far_ts":
            return self._valid(self._next(param), kind)
        if kind == "extra_field":  # unknown fields are ignored: still the same valid event
            event = self._next()
            case = self._valid(event, kind)
            case.payload = _bytes({**_body(event), **param})
            return case
        if kind == "dup":
            if f.dup_field is None or not self.published:
                return self._valid(self._next())
            first = self.published[0]
            body = {**_body(first), f.dup_field: f"changed-{self.i}"}
            value = str(_body(first)[f.dup_field])
            return Case(kind, first.subject(), _bytes(body), False, ("duplicate id with a different body",),
                        key=f.key(first), first_value=value)  # type: ignore[attr-defined]
        event = self._next()
        subject: str = event.subject()  # type: ignore[attr-defined]
        body = _body(event)
        if kind == "not_json":
            return Case(kind, subject, param, False, ("JSON", "invalid event"))
        if kind == "missing":
            body.pop(param)
            words = ("type", "not folded", "JSON") if param == "type" else (f"`{param}`", f"$.{param}")
            return Case(kind, subject, _bytes(body), False, words)
        if kind == "wrong_type":
            name, value = param
            body[name] = value
            return Case(kind, subject, _bytes(body), False, (f"$.{name}", f"`{name}`"))
        if kind == "negative":
            name, value = param
            body[name] = value
            return Case(kind, subject, _bytes(body), False, (f"$.{name}",))
        if kind in ("huge", "nan"):
            name = (f.numbers or f.ints or ("v",))[0]
            raw = _bytes({**body, name: 12345.5}).replace(b"12345.5", param.encode())
            if param == str(2**70) and name in f.numbers:  # huge but finite, and >= 0: a legal float
                self.published.append(event)
                return Case("huge_finite", subject, raw, True, key=f.key(event))
            # a huge int is out of range for an int64 field; a float overflows to infinity: both refused
            return Case(kind, subject, raw, False, (f"$.{name}", "JSON", "out of range", "finite"))
        if kind == "deep":
            target = f.free or "extras"
            raw = _bytes({**body, target: {"n": 0}}).replace(b'{"n": 0}', b'{"n": ' + b"[" * param + b"1" + b"]" * param
                                                              + b"}")
            return Case(kind, subject, raw, False, ("JSON", "depth", "recursion", "nest", f"$.{target}"))
        if kind == "bad_utf8":
            name, junk = param
            marker = "\u2603MARK\u2603"
            body[name] = marker
            raw = _bytes(body).replace(marker.encode(), junk)
            return Case(kind, subject, raw, False, ("JSON", "UTF-8", "utf-8", "invalid"))
        if kind == "oversize":
            target = f.free or "extras"
            body[target] = {"blob": "x" * OVERSIZE}
            return Case(kind, subject, _bytes(body), False, ("oversize",))
        if kind == "odd_subject":
            tokens = subject.split(".")
            # unique per case: on a compacted stream a second message on the subject replaces the first
            tokens[f.subject_token] = f"{param}{self.i}"
            return Case(kind, ".".join(tokens), encode_event(event), False, ("subject mismatch",))
        if kind == "bad_ts":
            body["ts"] = param
            return Case(kind, subject, _bytes(body), False, ("ts",))
        if kind == "wrong_family":
            raise AssertionError("the family test supplies wrong_family cases itself")
        raise AssertionError(kind)


async def run_family(fleet: Fleet, family: Family, n_examples: int, ts: str,
                     foreign: Callable[[int], tuple[str, bytes]]) -> dict[str, int]:
    """Publish the drawn cases (valid and bad interleaved) and check the view, the rejects,
    the projector and a rebuild. Returns the counts tried, by kind."""
    builder = Builder(family, ts)
    cases: list[Case] = []
    for plan in draw_cases(family, n_examples):
        cases.append(builder.build("valid", None))
        for kind, param in plan:
            if kind == "wrong_family":
                subject, payload = foreign(builder.i)
                cases.append(Case(kind, subject, payload, False, ("not folded", "subject mismatch", "invalid event")))
            else:
                cases.append(builder.build(kind, param))
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        js = nc.jetstream()
        for case in cases:
            case.seq = (await js.publish(case.subject, case.payload)).seq
        last = (await js.stream_info(family.stream)).state.last_seq
    finally:
        await nc.close()
    token = {family.stream: last}
    started = time.monotonic()

    async def folded() -> bool:
        # a batch with a bad event is folded again one event at a time: slow, but it must get there
        status = await fleet.status()
        return any(p.name == family.projection and p.checkpoints.get(family.stream, 0) >= last
                   for p in status.projections)

    await wait_until(folded, timeout_s=120, interval_s=0.2)
    fold_s = time.monotonic() - started

    good = [c for c in cases if c.valid]
    rows = (await fleet.sql(f"SELECT {family.key_sql} AS k, count(*) AS n FROM {family.table} GROUP BY 1",
                            max_rows=100_000, min_seq=token)).rows
    counts = {str(k): int(n) for k, n in rows}
    expected = {c.key for c in good}
    if set(counts) != expected:
        all_rejects = {r.seq: r.reason for r in (await fleet.rejects(family.projection, limit=10_000,
                                                                       min_seq=token)).items}
        extra = [(c.kind, c.payload[:300]) for c in cases
                 if not c.valid and c.kind != "dup" and family.key_of_payload(c) in counts]
        lost = [(c.kind, c.seq, all_rejects.get(c.seq)) for c in good if c.key not in counts]
        raise AssertionError(f"landed though bad: {extra[:4]}; valid but not in the view: {lost[:4]}")
    assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n != 1}
    for dup in (c for c in cases if c.first_value is not None):  # refused, and the first body stays
        got = (await fleet.sql(f"SELECT {family.dup_sql} FROM {family.table} WHERE {family.key_sql} = "
                               f"'{dup.key}'", min_seq=token)).rows
        assert got == [[dup.first_value]], (dup.kind, got)  # the first body wins, the copy changes nothing

    bad = {c.seq: c for c in cases if not c.valid}
    rejects = await fleet.rejects(family.projection, limit=10_000, min_seq=token)
    by_seq = {r.seq: r for r in rejects.items}
    assert not rejects.has_more
    missing = [(bad[s].kind, bad[s].subject, bad[s].payload[:80]) for s in sorted(set(bad) - set(by_seq))]
    assert not missing, missing
    assert set(by_seq) == set(bad), sorted(set(by_seq) - set(bad))  # no valid event was refused
    for seq, case in bad.items():
        reason = by_seq[seq].reason
        assert any(w.lower() in reason.lower() for w in case.words), (case.kind, case.words, reason)

    status = await fleet.status()
    (proj,) = [p for p in status.projections if p.name == family.projection]
    assert proj.state == "live" and proj.checkpoints[family.stream] >= last

    before = await _view(fleet, family, token)
    await rebuild_and_wait(fleet, family.projection)
    after = await _view(fleet, family, token)
    assert after == before

    tried: dict[str, int] = {}
    for c in cases:
        tried[c.kind] = tried.get(c.kind, 0) + 1
    print(f"\n[bad input {family.projection}] {len(cases)} cases ({len(good)} valid, {len(bad)} bad): "
          + ", ".join(f"{k} {n}" for k, n in sorted(tried.items())) + f"; folded {fold_s:.1f}s after the last ack")
    return tried


async def _view(fleet: Fleet, family: Family, token: dict[str, int]) -> list[str]:
    answer = await fleet.sql(f"SELECT * FROM {family.table}", max_rows=100_000, min_seq=token)
    cols = [c for c in answer.columns if c not in ("seq",)]
    idx = [answer.columns.index(c) for c in cols]
    return sorted(json.dumps([row[i] for i in idx], sort_keys=True, default=str) for row in answer.rows)


