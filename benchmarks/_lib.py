"""Helpers shared by the long, resumable benchmark scripts (retention study, pruning benchmark)."""

from __future__ import annotations

import json
import math
import os
import subprocess
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


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate over n episodes (sound near 0 and 1, unlike +-1.96 SE)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
