"""The identities registry under concurrent writers (review finding 5): `identities add` and
`revoke` in several processes at once each read, change and save identities.json; without a
lock the last save won, losing identities and bringing a revoked one back. Real processes,
real files; no broker (the registry is a file)."""

from __future__ import annotations

import multiprocessing
import threading
from multiprocessing.synchronize import Barrier
from pathlib import Path

from fleetlog.services.node.identities import Registry


def _add(d: Path, i: int, start: Barrier) -> None:
    start.wait()
    Registry(d).add("agent", f"a{i}", out=d / "seeds" / f"a{i}.nk")


def _revoke(d: Path, start: Barrier) -> None:
    start.wait()
    assert Registry(d).revoke("agent-victim")


def test_concurrent_adds_and_a_revoke_in_processes_lose_nothing(tmp_path: Path) -> None:
    Registry(tmp_path).add("agent", "victim", out=tmp_path / "seeds" / "victim.nk")
    ctx = multiprocessing.get_context("fork")  # a sync test: no event loop or threads to fork
    start = ctx.Barrier(9)
    procs = [ctx.Process(target=_add, args=(tmp_path, i, start)) for i in range(8)]
    procs.append(ctx.Process(target=_revoke, args=(tmp_path, start)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 9
    users = sorted(u["user"] for u in Registry(tmp_path).load())
    assert users == sorted(f"agent-a{i}" for i in range(8))  # every add, and the revoked one gone
    assert not [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")]  # no temp file left


def test_concurrent_adds_and_a_revoke_in_threads_lose_nothing(tmp_path: Path) -> None:
    Registry(tmp_path).add("agent", "victim", out=tmp_path / "seeds" / "victim.nk")
    start = threading.Barrier(9)
    errors: list[BaseException] = []

    def run(fn: object, *args: object) -> None:
        try:
            fn(*args)  # type: ignore[operator]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(_add, tmp_path, i, start)) for i in range(8)]
    threads.append(threading.Thread(target=run, args=(_revoke, tmp_path, start)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(u["user"] for u in Registry(tmp_path).load()) == sorted(f"agent-a{i}" for i in range(8))
