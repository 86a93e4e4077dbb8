"""Where a load's CPU went: the server, the database, the sink and wrk, per request, and how
much of the machine stayed idle. Read from /proc around each wrk run (Linux only).

A ratio to /healthz alone cannot tell a server that is held back by its own process (its
threads share one GIL) from one that is held back by the machine
(two cores shared with the database and wrk): idle cores during the load can.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

_TICK = 1 / os.sysconf("SC_CLK_TCK")
# Processes are told apart by their command line; a process without a mark of its own
# (uvicorn's `--workers` children, the writer's fork server and the writer it forks, all
# started by multiprocessing) takes its nearest marked ancestor's.
_MARKS = ((b"bench.forwarding:sink_app", "sink"), (b"bench.bare:app", "server"),
          (b"serve", "server"))
GROUPS = ("server", "database", "sink", "wrk")


@dataclass(frozen=True, slots=True)
class _Proc:
    parent: int
    group: str | None
    seconds: float


def _read(pid: int) -> _Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:  # gone meanwhile
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    group = "database" if comm.startswith("postgres") else None
    if group is None and (any(a.endswith(b"/dlr") for a in argv[:2]) or b"uvicorn" in argv):
        group = next((name for mark, name in _MARKS if mark in argv), None)
    return _Proc(int(fields[1]), group, (int(fields[11]) + int(fields[12])) * _TICK)


def _idle_and_total() -> tuple[float, float]:
    """Machine-wide idle and total core-seconds since boot (idle + iowait count as idle)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (values[3] + values[4]) * _TICK, sum(values) * _TICK


@dataclass(frozen=True, slots=True)
class Snapshot:
    pids: dict[int, tuple[str, float]]  # (group, CPU seconds) of every process of a group
    idle: float
    total: float
    children: float  # waited-for children (wrk): RUSAGE_CHILDREN

    @staticmethod
    def take() -> Snapshot:
        procs = {int(p.name): proc for p in Path("/proc").iterdir()
                 if p.name.isdigit() and (proc := _read(int(p.name))) is not None}
        pids: dict[int, tuple[str, float]] = {}
        for pid, proc in procs.items():
            group, ancestor = proc.group, procs.get(proc.parent)
            for _ in range(8):  # a few generations: a loop of parents cannot hang it
                if group is not None or ancestor is None:
                    break
                group, ancestor = ancestor.group, procs.get(ancestor.parent)
            if group is not None:
                pids[pid] = (group, proc.seconds)
        idle, total = _idle_and_total()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return Snapshot(pids, idle, total, usage.ru_utime + usage.ru_stime)


def used(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds by group between two snapshots, `idle_core_s` and `wall_core_s` (the
    machine's idle and total core-seconds). A process that started meanwhile counts from
    zero; one that ended meanwhile is lost, except wrk (waited for: RUSAGE_CHILDREN)."""
    out = dict.fromkeys(GROUPS, 0.0)
    for pid, (group, seconds) in after.pids.items():
        out[group] += seconds - before.pids.get(pid, (group, 0.0))[1]
    out["wrk"] = after.children - before.children
    out["idle_core_s"] = after.idle - before.idle
    out["wall_core_s"] = after.total - before.total
    return out


def per_request(cpu: dict[str, float], requests: int) -> dict[str, float]:
    """µs of CPU per request by group, and the idle cores (of os.cpu_count())."""
    cores = os.cpu_count() or 1
    summary = {f"{g}_us": round(cpu.get(g, 0.0) / max(requests, 1) * 1e6, 1) for g in GROUPS}
    wall = cpu.get("wall_core_s", 0.0)
    summary["idle_cores"] = round(cpu.get("idle_core_s", 0.0) / wall * cores, 2) if wall else 0.0
    return summary


def cell(summary: dict[str, float], baseline: dict[str, float] | None = None) -> str:
    """The README table's CPU column."""
    parts = [f"server {summary['server_us']:.0f}"
             + (f" (/healthz {baseline['server_us']:.0f})" if baseline else "")]
    parts += [f"{g} {summary[f'{g}_us']:.0f}" for g in ("database", "sink", "wrk")
              if summary[f"{g}_us"] >= 1]
    return ", ".join(parts) + f"; {summary['idle_cores']:.2f} idle"
