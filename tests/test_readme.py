"""The README's processor tour runs as written (real broker, real DuckDB): the README stays true."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

from fleetlog import Fleet

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_block(section: str) -> str:
    text = README.read_text()
    start = text.index(f"### {section}")
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match is not None, f"no python block under {section}"
    return match.group(1)


async def test_the_processor_tour_runs(fleet: Fleet, tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        p = tmp_path / f"in-{i}.csv"
        p.write_text(f"a,b\n{i},{i}\n")
        paths.append(str(p))
    code = "async def tour(fleet, paths):\n" + textwrap.indent(_python_block("Processor bookkeeping"), "    ")
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    await namespace["tour"](fleet, paths)
    token = await fleet.flush()
    files = await fleet.processors.files("ingest", min_seq=token)
    assert sorted((f.file_path, f.status) for f in files.items) == sorted(
        [*((p, "done") for p in paths), ("/in/bad.csv", "failed")])
    (run,) = (await fleet.processors.runs("ingest")).items
    assert (run.status, run.files_total, run.files_ok) == ("completed", 3, 3)
    assert not (await fleet.processors.lock("ingest")).held
