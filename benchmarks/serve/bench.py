"""Loopback load test of `craftvla serve` against in-process `policy.infer`.

    .venv/bin/python benchmarks/serve/bench.py run      # resumable: one result file per cell
    .venv/bin/python benchmarks/serve/bench.py report   # results.md

The policy is the shipped generalist (tiny preset, 64 px). Cells: in-process `infer` (one caller,
the floor), and the server in its own process (`craftvla serve`, as deployed, default limits) with
N = 1, 4, 16, 32 concurrent clients x M requests each, for --max_batch 1 (one request per forward)
and 8 (requests waiting together share a forward); then two cells past the limits, 32 clients
against --server.max_queue 8 (a request finding 8 already queued is answered "busy", the client
reconnects and goes on) and against --server.max_connections 16 (16 clients are refused HTTP 503
at the handshake). Each client sends a real Meta-World observation and waits for the answer before
the next request (a robot's control loop). Per cell: p50/p95/p99 latency of the answered requests
as the client sees it, requests/s over the whole cell, busy answers and refused connections.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from _lib import write_json  # noqa: E402

RESULTS = HERE / "results"
CHECKPOINT = ROOT / "assets" / "generalist" / "checkpoint"
# (kind, clients, --max_batch, extra serve flags)
CELLS = (
    [("inprocess", 1, 1, ())]
    + [("server", clients, batch, ()) for batch in (1, 8) for clients in (1, 4, 16, 32)]
    + [
        ("server", 32, 8, ("--server.max_queue", "8")),
        ("server", 32, 8, ("--server.max_connections", "16")),
    ]
)


def observation() -> dict:
    """One real drawer-close observation at the generalist's image size (cached on first use)."""
    from craftvla.sim.metaworld import MetaWorldEnv

    with MetaWorldEnv("drawer-close-v3", image_size=64, cameras=("corner",)) as env:
        obs = env.reset(0)
    return {k: obs[k] for k in ("observation.images.corner", "observation.state", "task")}


def summarise(latencies_ms: list[float], wall_s: float) -> dict:
    lat = np.asarray(latencies_ms)
    return {
        "requests": len(lat),
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "requests_per_s": len(lat) / wall_s,
    }


def in_process(requests: int, warmup: int) -> dict:
    import torch

    from craftvla.model.policy import VLAPolicy

    torch.set_num_threads(2)
    policy = VLAPolicy.from_pretrained(CHECKPOINT).eval()
    obs = observation()
    for _ in range(warmup):
        policy.infer(obs)
    latencies, start = [], time.perf_counter()
    for _ in range(requests):
        t = time.perf_counter()
        policy.infer(obs)
        latencies.append((time.perf_counter() - t) * 1000)
    return summarise(latencies, time.perf_counter() - start)


def over_server(clients: int, max_batch: int, requests: int, warmup: int, flags: tuple = ()) -> dict:
    from craftvla.errors import CraftVLAError
    from craftvla.serve.client import PolicyClient
    from tests.launch import free_port

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "craftvla",
            "serve",
            "--checkpoint",
            str(CHECKPOINT),
            "--port",
            str(port),
            "--max_batch",
            str(max_batch),
            *flags,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_healthy(port)
        url, obs = f"ws://127.0.0.1:{port}", observation()
        connections, refused = [], 0
        for _ in range(clients):
            try:
                connections.append(PolicyClient(url))
            except CraftVLAError as err:  # HTTP 503 past --server.max_connections
                assert "HTTP 503" in str(err), err
                refused += 1
        for c in connections:
            for _ in range(warmup):
                c.actions(obs)
        latencies: list[float] = []
        busy = [0]
        lock, go = threading.Lock(), threading.Barrier(len(connections) + 1)

        def loop(client):
            mine, refusals = [], 0
            go.wait()
            for _ in range(requests):
                t = time.perf_counter()
                try:
                    client.actions(obs)
                except CraftVLAError as err:  # "busy" past --server.max_queue: the server closed; reconnect
                    assert "busy" in str(err), err
                    refusals += 1
                    client.close()
                    client = PolicyClient(url)
                    continue
                mine.append((time.perf_counter() - t) * 1000)
            client.close()
            with lock:
                latencies.extend(mine)
                busy[0] += refusals

        threads = [threading.Thread(target=loop, args=(c,)) for c in connections]
        for t in threads:
            t.start()
        go.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        return {**summarise(latencies, wall), "busy": busy[0], "refused_connections": refused}
    finally:
        server.terminate()
        server.wait(timeout=60)


def _wait_healthy(port: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"server on port {port} did not come up")


def run(args) -> None:
    sys.path.insert(0, str(ROOT))
    for kind, clients, batch, flags in CELLS:
        out = RESULTS / f"{cell_name(kind, clients, batch, flags)}.json"
        if out.is_file():
            continue
        if kind == "inprocess":
            record = in_process(args.requests * 4, args.warmup)
        else:
            record = over_server(clients, batch, args.requests, args.warmup, flags)
        write_json(out, {"kind": kind, "clients": clients, "max_batch": batch, "flags": list(flags), **record})
        print(out.name, f"p50 {record['p50_ms']:.1f} ms, {record['requests_per_s']:.1f} req/s", flush=True)


def cell_name(kind: str, clients: int, batch: int, flags: tuple) -> str:
    extra = "".join(f"__{f.lstrip('-').split('.')[-1]}{v}" for f, v in zip(flags[::2], flags[1::2]))
    return f"{kind}__c{clients}__b{batch}{extra}"


def report() -> None:
    rows = [{**json.loads(p.read_text()), "name": p.stem} for p in sorted(RESULTS.glob("*.json"))]
    base = next((r for r in rows if r["kind"] == "inprocess"), None)
    lines = [
        "# `craftvla serve` under load (loopback) vs in-process `infer`",
        "",
        "Command: `.venv/bin/python benchmarks/serve/bench.py run` then `... report`. The shipped generalist "
        "(tiny preset, 64 px), one drawer-close observation; each client waits for its answer before the "
        "next request. Server in its own process. Latency is what the caller sees.",
        "",
        "| where | clients | --max_batch | limit flags | answered | busy | refused conns | p50 ms | p95 ms "
        "| p99 ms | requests/s | vs in-process req/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {cell_name(*cell): i for i, cell in enumerate(CELLS)}
    for r in sorted(rows, key=lambda r: order.get(r.get("name", ""), 99)):
        ratio = f"{r['requests_per_s'] / base['requests_per_s']:.2f}x" if base else "-"
        lines.append(
            f"| {'in-process infer' if r['kind'] == 'inprocess' else 'server'} | {r['clients']} | "
            f"{r['max_batch'] if r['kind'] == 'server' else '-'} | {' '.join(r.get('flags', [])) or '-'} | "
            f"{r['requests']} | {r.get('busy', 0)} | {r.get('refused_connections', 0)} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['requests_per_s']:.1f} | {ratio} |"
        )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("verb", choices=("run", "report"))
    parser.add_argument("--requests", type=int, default=50, help="requests per client per cell")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests per client first")
    args = parser.parse_args(argv)
    run(args) if args.verb == "run" else report()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
