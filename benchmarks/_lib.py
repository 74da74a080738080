"""Helpers shared by the long, resumable benchmark scripts (retention and continual studies, pruning benchmark)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path


def sh(args: list, log: Path) -> None:
    """Run a command, its output appended to `log`; raise with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, args))}\n")
        f.flush()
        code = subprocess.call(
            [str(a) for a in args], stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "MUJOCO_GL": "egl"}
        )
    if code:
        raise SystemExit(f"failed ({code}): {' '.join(map(str, args))}\n{log.read_text()[-3000:]}")


def write_json(path: Path, record: dict) -> None:
    """Write a result file atomically (a killed run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def claim(cell: Path) -> bool:
    """Take the cell for this process (a `.claim` file holding its pid); False if a live process has it.

    Lets two study processes share the work (`OMP_NUM_THREADS=1`, one per core; the retention and
    continual studies): evaluation runs the simulator on one core, so a second process fills the other.
    """
    lock = cell / ".claim"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)  # empty: its writer died (e.g. a full disk) before the pid
                if pid <= 0:
                    raise ValueError(pid)  # os.kill(0, 0) would signal our own process group: "alive"
                os.kill(pid, 0)
                return False  # alive
            except (ProcessLookupError, ValueError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def run_parallel(script: str, n: int, argv: list[str]) -> int:
    """`n` copies of `script argv` (each claims cells as it goes), one torch thread each."""
    flags = [a for i, a in enumerate(argv) if a != "--processes" and (i == 0 or argv[i - 1] != "--processes")]
    flags = [a for a in flags if not a.startswith("--processes=")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STUDY_PROCESSES": str(n)}
    procs = [subprocess.Popen([sys.executable, script, *flags], env=env) for _ in range(n)]
    return max(p.wait() for p in procs)


def study_args(doc: str, methods: list[str], argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """A study's command line (`run` / `report`, --methods, --seeds, --processes) and the methods picked."""
    parser = argparse.ArgumentParser(prog="study.py", description=doc.split("\n\n")[0])
    parser.add_argument("verb", choices=("run", "report"))
    parser.add_argument("--methods", default="all", help=f"comma-separated, or all: {', '.join(methods)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="study processes sharing the cells, one torch thread each (2 on a 2-core machine)",
    )
    args = parser.parse_args(argv)
    picked = list(methods) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in picked if m not in methods]
    if unknown:
        parser.error(f"unknown methods {unknown}")
    return args, picked


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate over n episodes (sound near 0 and 1, unlike +-1.96 SE)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
