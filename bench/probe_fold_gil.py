"""Probe (issue 19): does a 5,000-row INSERT … SELECT into `attempts` need the GIL?

For each way of handing the prepared batch to DuckDB, the INSERT's wall time alone and
while another thread spins pure Python (the prepare thread's and the reader's stand-in),
in alternation. Also the prepare-side cost of producing that form.

    python bench/probe_fold_gil.py [--rounds 6] [--pane-bytes 2048]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import AttemptFactory, attempt_payloads, emit_json, table
from fleetlog.projections._base import RawBatch
from fleetlog.projections.attempts import AttemptsProjection
from fleetlog.projections.attempts_raw import prepare_attempts

ROWS = 5_000
COLS = ("CAST(b.id AS UUID), seq, ts, ts_utc, agent, action, outcome, elapsed_s, "
        "pane_before, pane_after, extras")


def batch(fac: AttemptFactory, base: int) -> RawBatch:
    items = attempt_payloads(fac, base, ROWS, 10 * ROWS)
    t = pa.table({"seq": pa.array(range(base + 1, base + ROWS + 1), pa.int64()),
                  "subject": pa.array([s for _, s, _ in items], pa.string()),
                  "data": pa.array([p.decode() for _, _, p in items], pa.string())})
    return RawBatch("FLEET_ATTEMPTS", t)


class Spinner:
    def __init__(self) -> None:
        self.on = False
        self.stop = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        while not self.stop:
            if self.on:
                x = 0
                for i in range(10_000):
                    x += i
            else:
                time.sleep(0.001)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--pane-bytes", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0, help="DuckDB threads (0: its default)")
    ap.add_argument("--switch", type=float, default=0.0, help="sys.setswitchinterval (0: leave)")
    args = ap.parse_args()
    if args.switch:
        sys.setswitchinterval(args.switch)
    fac = AttemptFactory(pane_bytes=args.pane_bytes, ts_spread_days=1)
    work = Path(tempfile.mkdtemp(prefix="probe-gil-", dir="/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="probe-gil-", dir="/dev/shm"))
    con = duckdb.connect(str(work / "v.duckdb"))
    for d in AttemptsProjection().ddl():
        con.execute(d)
    if args.threads:
        con.execute(f"SET threads = {args.threads}")
    spin = Spinner()
    results: dict[str, dict[str, list[float]]] = {}
    base = 0

    def rec(name: str, key: str, v: float) -> None:
        results.setdefault(name, {}).setdefault(key, []).append(v * 1000)

    try:
        for _ in range(args.rounds):
            for name in ("arrow", "parquet"):
                for contended in (False, True):
                    rows = prepare_attempts(batch(fac, base)).rows
                    base += ROWS
                    t0 = time.perf_counter()
                    if name == "arrow":
                        con.register("src", rows)
                        src = "src"
                    elif name == "parquet":
                        path = shm / f"b{base}.parquet"
                        pq.write_table(rows, path, compression="none", use_dictionary=False,
                                       write_statistics=False)
                        src = f"read_parquet('{path}')"
                    else:
                        path = shm / f"b{base}.arrows"
                        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, rows.schema) as w:
                            w.write_table(rows)
                        src = f"read_arrow('{path}')"
                    made = time.perf_counter() - t0
                    spin.on = contended
                    time.sleep(0.01)
                    con.execute("BEGIN")
                    t0 = time.perf_counter()
                    try:
                        con.execute(f"INSERT INTO attempts SELECT {COLS} FROM {src} b")
                    except duckdb.Error as exc:
                        print(name, "failed:", str(exc).splitlines()[0])
                        con.execute("ROLLBACK")
                        spin.on = False
                        continue
                    dt = time.perf_counter() - t0
                    t1 = time.perf_counter()
                    con.execute("COMMIT")
                    rec(name, "commit_contended_ms" if contended else "commit_alone_ms", time.perf_counter() - t1)
                    spin.on = False
                    if name == "arrow":
                        con.unregister("src")
                    else:
                        os.unlink(path)
                    rec(name, "contended_ms" if contended else "alone_ms", dt)
                    rec(name, "make_ms", made)
    finally:
        spin.stop = True
        con.close()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    out = {n: {k: round(sorted(v)[len(v) // 2], 1) for k, v in d.items()} for n, d in results.items()}
    rows_ = [[n, d.get("alone_ms"), d.get("contended_ms"), d.get("commit_alone_ms"), d.get("commit_contended_ms"),
              d.get("make_ms")] for n, d in out.items()]
    print(table(rows_, ["form", "INSERT alone ms (median)", "INSERT w/ Python thread ms", "COMMIT alone",
                        "COMMIT w/ Python thread", "make ms"]))
    emit_json("probe_fold_gil", {"pane_bytes": args.pane_bytes, "rounds": args.rounds, "results": out})


if __name__ == "__main__":
    main()
