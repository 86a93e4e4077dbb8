"""The benchmark's CPU accounting (bench/cpu.py): a busy `dlr serve` and its `--workers`
child count as the server, a finished load generator as wrk, and the rest stays out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.cpu import Snapshot, cell, per_request, used

# Burns CPU until told to stop by its stdin closing; with "child" it starts a child whose
# command line carries no mark of its own (as uvicorn's --workers and the writer's fork
# server do), which starts a busy grandchild of its own (as the fork server its writer) and
# idles (a third busy process made the readings' timing drift past the tolerance).
_BUSY = """
import subprocess, sys, threading, time
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
kid = None
if "child" in sys.argv:
    kid = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\\n"
                            "subprocess.Popen([sys.executable, '-c', 'while True: pass'])\\n"
                            "time.sleep(3600)"])
print("ready", flush=True)
while not stop.is_set():
    sum(range(1000))
if kid is not None:
    kid.kill()
"""


def _cpu_seconds(*pids: int) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_server_and_its_worker_count_as_the_server_and_wrk_as_wrk(tmp_path: Path) -> None:
    grandkids: list[int] = []
    fake = tmp_path / "dlr"
    fake.write_text(_BUSY)
    server = subprocess.Popen([sys.executable, str(fake), "serve", "child"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    bystander = subprocess.Popen([sys.executable, "-c", _BUSY], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and bystander.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        assert bystander.stdout.readline().strip() == "ready"
        kids = _children(server.pid)
        assert len(kids) == 1
        deadline = time.monotonic() + 10
        while not (grandkids := _children(kids[0])) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(grandkids) == 1
        group = (server.pid, kids[0], grandkids[0])
        # Each snapshot is read between two direct readings of the group: what the snapshots
        # count lies between what the inner and the outer pair measure (reading all of /proc
        # takes long enough for busy processes to run meanwhile).
        outer_before = _cpu_seconds(*group)
        before = Snapshot.take()
        server_before, others_before = _cpu_seconds(*group), _cpu_seconds(bystander.pid)
        # The load generator: a child that runs to its end and is waited for.
        subprocess.run([sys.executable, "-c",
                        "import time\nt = time.process_time()\n"
                        "while time.process_time() - t < 0.3: pass"], check=True)
        time.sleep(0.3)
        server_after, others_after = _cpu_seconds(*group), _cpu_seconds(bystander.pid)
        after = Snapshot.take()
        outer_after = _cpu_seconds(*group)
        cpu = used(before, after)
    finally:
        for pid in grandkids:
            os.kill(pid, signal.SIGKILL)
        for proc in (server, bystander):
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=10)
            proc.stdout.close()  # type: ignore[union-attr]
    server_used, others_used = server_after - server_before, others_after - others_before
    assert server_used > 0.2 and others_used > 0.1  # both were busy
    # Counted: the server and its unmarked descendants; not counted: the bystander.
    tick = 0.01 * len(group) * 2  # each reading is in whole clock ticks, per process
    assert server_used - tick <= cpu["server"] <= outer_after - outer_before + tick
    assert 0.25 <= cpu["wrk"] < 0.6
    # The machine's own PostgreSQL may do background work (autovacuum) meanwhile: a tick or
    # two of it, never the busy processes' seconds.
    assert cpu["database"] < 0.1 and cpu["sink"] == 0.0
    assert cpu["wall_core_s"] > cpu["idle_core_s"] >= 0.0

    summary = per_request(cpu, requests=1000)
    assert summary["server_us"] == round(cpu["server"] / 1000 * 1e6, 1)
    text = cell(summary, per_request(cpu, requests=4000))
    assert text.startswith(f"server {summary['server_us']:.0f} (/healthz ")
    assert "wrk" in text and "database" not in text and text.endswith(" idle")
