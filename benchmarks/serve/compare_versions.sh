#!/bin/bash
# The server at another revision vs this tree, side by side in one session (alternating, two rounds):
#   bash benchmarks/serve/compare_versions.sh 384a166
# Each round and tree: 1 client --max_batch 1, then 16 clients --max_batch 8, 50 requests per client.
# The other revision is checked out as a git worktree under /tmp (removed at the end).
set -euo pipefail
rev=${1:?usage: compare_versions.sh REVISION}
here=$(cd "$(dirname "$0")/../.." && pwd)
other=/tmp/craftvla-compare-$rev
[ -d "$other" ] || git -C "$here" worktree add -q "$other" "$rev"
trap 'git -C "$here" worktree remove --force "$other"' EXIT
for round in 1 2; do
  for root in "$other" "$here"; do
    label=$([ "$root" = "$here" ] && echo this || echo "$rev")
    (cd "$root" && PYTHONPATH="$root/src:$root" "$here/.venv/bin/python" - "$label" "$round" <<'PY'
import sys
sys.path[:0] = ["benchmarks/serve", "benchmarks", "."]
import bench
label, rnd = sys.argv[1], sys.argv[2]
for clients, batch in [(1, 1), (16, 8)]:
    r = bench.over_server(clients, batch, 50, 5)
    print(f"{label} round {rnd} clients {clients} batch {batch}: p50 {r['p50_ms']:.1f} ms, "
          f"p99 {r['p99_ms']:.1f} ms, {r['requests_per_s']:.1f} req/s", flush=True)
PY
    )
  done
done
