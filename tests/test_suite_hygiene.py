"""The test command always finishes: a hang fails one test with its stacks, and test brokers
die with the pytest process that started them, even when it is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

INI = textwrap.dedent("""\
    [pytest]
    asyncio_mode = auto
    asyncio_default_fixture_loop_scope = function
    timeout_method = signal
    """)


def _pytest(tmp_path: Path, test_code: str, *extra: str) -> subprocess.Popen[str]:
    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(test_code))
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", "-q", *extra,
         str(tmp_path / "test_inner.py")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_a_hung_test_fails_alone_with_its_stacks(tmp_path: Path) -> None:
    proc = _pytest(tmp_path, """
        import asyncio

        async def test_hangs():
            await asyncio.sleep(3600)

        def test_after_the_hang_still_runs():
            assert True
        """, "-o", "timeout=3")
    out, _ = proc.communicate(timeout=120)
    assert "1 failed, 1 passed" in out, out
    assert "Timeout" in out and "test_hangs" in out, out  # the stacks of the hung test are shown


def test_a_test_broker_dies_with_a_sigkilled_pytest(tmp_path: Path) -> None:
    pid_file = tmp_path / "broker.pid"
    proc = _pytest(tmp_path, f"""
        import asyncio
        from pathlib import Path
        from fleetlog.services.node.broker import EmbeddedBroker, free_port

        async def test_holds_a_broker(tmp_path):
            broker = EmbeddedBroker(tmp_path / "b", port=free_port())
            await broker.start()
            Path({str(pid_file)!r}).write_text(str(broker.process.pid))
            await asyncio.sleep(3600)
        """, "-o", "timeout=600")
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the inner test never started its broker"
        time.sleep(0.1)
    broker = psutil.Process(int(pid_file.read_text()))
    assert broker.is_running() and "nats-server" in broker.name()
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    gone, alive = psutil.wait_procs([broker], timeout=30)
    for p in alive:  # leave nothing behind even when the assertion below fails
        p.kill()
    assert gone and not alive, "the test broker outlived the SIGKILLed pytest"
