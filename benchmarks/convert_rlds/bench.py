"""`craftvla convert rlds` throughput and peak memory, on the TFDS-written fixture scaled up.

    .venv/bin/python benchmarks/convert_rlds/bench.py run [--tfds_python /tmp/tfenv/bin/python]
    .venv/bin/python benchmarks/convert_rlds/bench.py report

Scaling: the fixture's 4 real TFDS records (episodes of 6-12 steps, two 32 px cameras, one JPEG and
one PNG) are copied N times into shards of 50 episodes each, re-framed with fresh CRCs. Each cell
runs in its own process so its peak RSS is its own: convert 200 and 2,000 episodes (bounded memory:
the peak should not grow with N), and the reader alone (parse + decode, no writing). With
--tfds_python (an interpreter with tensorflow-datasets, e.g. the fixture's throwaway venv), the
same reading through `tfds.builder_from_directory(...).as_dataset()` runs beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from _lib import write_json  # noqa: E402

RESULTS = HERE / "results"
FIXTURE = ROOT / "tests" / "data" / "fixtures" / "rlds" / "craftvla_rlds_fixture" / "1.0.0"
PER_SHARD = 50
TFDS_READ = """
import sys, time, tensorflow_datasets as tfds
start = time.perf_counter(); n = steps = 0
for ep in tfds.as_numpy(tfds.builder_from_directory(sys.argv[1]).as_dataset(split="train", shuffle_files=False)):
    n += 1; steps += sum(1 for _ in ep["steps"])
print(n, steps, time.perf_counter() - start)
"""


def _frame(record: bytes) -> bytes:
    from craftvla.data.rlds import _masked_crc

    length = struct.pack("<Q", len(record))
    return length + struct.pack("<I", _masked_crc(length)) + record + struct.pack("<I", _masked_crc(record))


def scaled_copy(episodes: int, out: Path) -> Path:
    """A TFDS directory like the fixture with `episodes` records (copies of its 4), PER_SHARD a shard."""
    from craftvla.data.rlds import RldsDataset, read_records

    source = RldsDataset(FIXTURE)
    records = [r for shard in source.shards("train") for r in read_records(shard)]
    shards = (episodes + PER_SHARD - 1) // PER_SHARD
    out.mkdir(parents=True)
    shutil.copy(FIXTURE / "features.json", out)
    lengths = []
    for s in range(shards):
        count = min(PER_SHARD, episodes - s * PER_SHARD)
        with open(out / f"{source.name}-train.tfrecord-{s:05d}-of-{shards:05d}", "wb") as f:
            for i in range(count):
                f.write(_frame(records[(s * PER_SHARD + i) % len(records)]))
        lengths.append(str(count))
    info = json.loads((FIXTURE / "dataset_info.json").read_text())
    info["splits"] = [
        {"name": "train", "shardLengths": lengths, "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"}
    ]
    (out / "dataset_info.json").write_text(json.dumps(info))
    return out


def cell(kind: str, src: str, out: str) -> dict:
    """Run in a child process: convert (or only read) `src`; time, frames, this process's peak RSS."""
    from craftvla.data.convert import RldsConvertConfig, convert_rlds
    from craftvla.data.rlds import RldsDataset

    start = time.perf_counter()
    if kind == "convert":
        result = convert_rlds(RldsConvertConfig(src=src, out=out, progress=False))
        episodes, frames = result["episodes"], result["frames"]
    else:
        episodes = frames = 0
        for ep in RldsDataset(src).episodes("train"):
            episodes, frames = episodes + 1, frames + len(ep["steps/action"])
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"episodes": episodes, "frames": frames, "seconds": seconds, "peak_rss_mb": peak_mb}


def run(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="rlds_bench_"))
    try:
        for episodes, kind in ((200, "convert"), (2000, "convert"), (2000, "read")):
            out = RESULTS / f"{kind}__{episodes}.json"
            if out.is_file():
                continue
            src = work / f"src{episodes}"
            if not src.exists():
                scaled_copy(episodes, src)
            cmd = [sys.executable, __file__, "cell", kind, str(src), str(work / f"out_{kind}_{episodes}")]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            record = {"kind": kind, **json.loads(done.stdout.strip().splitlines()[-1])}
            write_json(out, record)
            print(out.name, record, flush=True)
        out = RESULTS / "tfds_read__2000.json"
        if args.tfds_python and not out.is_file():
            src = work / "src2000"
            if not src.exists():
                scaled_copy(2000, src)
            done = subprocess.run(
                [args.tfds_python, "-c", TFDS_READ, str(src)], capture_output=True, text=True, check=True
            )
            n, steps, seconds = done.stdout.strip().splitlines()[-1].split()
            write_json(out, {"kind": "tfds_read", "episodes": int(n), "frames": int(steps), "seconds": float(seconds)})
            print(out.name, seconds, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report() -> None:
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    lines = [
        "# `craftvla convert rlds`: throughput and peak memory",
        "",
        "Command: `.venv/bin/python benchmarks/convert_rlds/bench.py run --tfds_python /tmp/tfenv/bin/python` "
        "then `... report`. Source: the TFDS-written fixture's 4 episodes (two 32 px cameras, JPEG + PNG, "
        "6-12 steps) copied N times, 50 episodes per shard. Each row is its own process.",
        "",
        "| what | episodes | frames | seconds | episodes/s | frames/s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {
        "convert__200": "convert to LeRobot v3.0 (h264)",
        "convert__2000": "convert to LeRobot v3.0 (h264)",
        "read__2000": "craftvla reader only (CRC + parse + decode)",
        "tfds_read__2000": "TFDS as_dataset (TensorFlow)",
    }
    for key, label in labels.items():
        r = rows.get(key)
        if r:
            lines.append(
                f"| {label} | {r['episodes']} | {r['frames']} | {r['seconds']:.2f} | "
                f"{r['episodes'] / r['seconds']:.0f} | {r['frames'] / r['seconds']:.0f} | "
                f"{r['peak_rss_mb']:.0f} |"
                if "peak_rss_mb" in r
                else f"| {label} | {r['episodes']} | {r['frames']} | {r['seconds']:.2f} | "
                f"{r['episodes'] / r['seconds']:.0f} | {r['frames'] / r['seconds']:.0f} | - |"
            )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("verb", choices=("run", "report", "cell"))
    parser.add_argument("cell", nargs="*", help="(internal) kind src out")
    parser.add_argument("--tfds_python", default="", help="a Python with tensorflow-datasets, to time TFDS reading")
    args = parser.parse_args(argv)
    if args.verb == "cell":
        print(json.dumps(cell(*args.cell)))
    elif args.verb == "run":
        run(args)
    else:
        report()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
