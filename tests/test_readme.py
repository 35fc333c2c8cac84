"""Every block of the README's tour runs as written, each in a fresh process, against a real
broker with the projector, query service and reactors running (as `fleetlog up` runs them),
and exits: the README stays true. A block that leaves a fact behind must find it in the view."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from subprocess import PIPE

import pytest
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

from .helpers import wait_until

README = Path(__file__).resolve().parent.parent / "README.md"


def tour_blocks() -> list[tuple[str, str, str]]:
    """(id, language, code) of every fenced block after "## A short tour"."""
    text = README.read_text()
    tour = text[text.index("## A short tour"):]
    blocks = []
    heading = "tour"
    for match in re.finditer(r"^### ([^\n]+)$|^```(\w*)\n(.*?)^```", tour, re.S | re.M):
        if match.group(1):
            heading = match.group(1).lower().replace(" ", "-")
            continue
        blocks.append((f"{heading}-{len(blocks)}-{match.group(2) or 'text'}", match.group(2), match.group(3)))
    return blocks


BLOCKS = tour_blocks()


@pytest.fixture
async def live_server(settings: FleetSettings) -> AsyncIterator[Server]:
    srv = Server(settings.model_copy(update={"reactors": True}))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def test_the_tour_has_only_runnable_blocks() -> None:
    assert {lang for _, lang, _ in BLOCKS} == {"python", "sh"}, [b[0] for b in BLOCKS if b[1] not in ("python", "sh")]
    assert sum(lang == "python" for _, lang, _ in BLOCKS) >= 6


@pytest.mark.parametrize(("lang", "code"), [(lang, code) for _, lang, code in BLOCKS], ids=[b[0] for b in BLOCKS])
async def test_a_tour_block_runs_as_written(lang: str, code: str, live_server: Server, settings: FleetSettings,
                                            tmp_path: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir(parents=True)
    for key in ("alice/s1.jsonl", "alice/s2.jsonl", "bob/s3.jsonl"):  # the processor tour's ./sessions
        (work / "sessions" / key).parent.mkdir(parents=True, exist_ok=True)
        (work / "sessions" / key).write_text('{"role": "user"}\n{"role": "assistant"}\n')
    env = {**os.environ, "FLEETLOG_NATS_URL": settings.nats_url, "FLEETLOG_SPOOL_DIR": str(tmp_path / "spool"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if lang == "python":
        (work / "snippet.py").write_text(code)
        argv = [sys.executable, "snippet.py"]
    else:
        (work / "snippet.sh").write_text(code)
        argv = ["bash", "-euo", "pipefail", "snippet.sh"]
    # The server runs in this test's event loop: the block runs beside it, never blocking it.
    # Its own process group: a block that fails or hangs is ended with everything it started
    # (a shell block's `fleetlog ... watch` would otherwise outlive it).
    proc = await asyncio.create_subprocess_exec(*argv, cwd=work, env=env, stdout=PIPE, stderr=PIPE,
                                                start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            await proc.wait()
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{out.decode()}\n--- stderr\n{err.decode()}"

    async with Fleet.connect(settings=settings) as fleet:
        # Nothing the block published was refused by a view.
        assert (await fleet.rejects()).items == []
        if "agent=\"beta\"" in code:  # FleetSync: ten records, the process ended right after them
            async def ten() -> bool:
                return (await fleet.attempts.summarize("beta")).counts.get("tick:success", 0) == 10
            await wait_until(ten, 30)
        if "processors.run(" in code:  # the run marked all three sessions and left its record
            assert await fleet.processors.processed_session_files("wordcount") == {
                "alice/s1.jsonl", "alice/s2.jsonl", "bob/s3.jsonl"}
            (record,) = (await fleet.processors.runs("wordcount")).items
            assert (record.processed, record.items_extracted, record.ok) == (3, 6, True)
