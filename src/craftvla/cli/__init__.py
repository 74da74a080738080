"""`craftvla <verb> [--flag value ...]`: one entry point, one module per verb.

Each verb lives in the module that owns the concept and exposes `main(argv) -> int`; it is
imported only when invoked, so `craftvla collect` never imports the training stack.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from craftvla.errors import CraftVLAError

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "collect": ("craftvla.sim.collect", "record scripted-expert demonstrations as a LeRobot v3 dataset"),
    "convert": ("craftvla.data.convert", "convert a dataset to LeRobot v3.0: convert rlds (TFDS/RLDS shards)"),
    "train": ("craftvla.train.loop", "train / fine-tune a policy (CRaFT, LoRA, DDP via accelerate)"),
    "eval": ("craftvla.sim.evaluate", "closed-loop evaluation in the simulator"),
    "cache": ("craftvla.craft.cache_build", "build an offline anchor cache"),
    "prune": ("craftvla.prune.commands", "vision-token pruning: prune train --stage 1|2, prune eval"),
    "serve": ("craftvla.serve.server", "serve a checkpoint over a websocket (openpi's protocol)"),
    "demo": ("craftvla.demo", "the whole story on a CPU with a built-in default"),
    "info": ("craftvla.model.summary", "print a preset's or a release's shapes, parameter counts and files"),
}


def run_sub_verb(verb: str, argv: list[str], sub_verbs: dict[str, tuple[Callable[[list[str]], int], str]]) -> int:
    """`craftvla <verb> <sub-verb> [flags]`: run the sub-verb's entry, or list the sub-verbs (exit 0
    for --help, 2 when none or an unknown one is given)."""
    if argv and argv[0] in sub_verbs:
        return int(sub_verbs[argv[0]][0](argv[1:]) or 0)
    lines = [
        f"usage: craftvla {verb} <{'|'.join(sub_verbs)}> [--flag value ...]   "
        f"(craftvla {verb} {next(iter(sub_verbs))} --help for its flags)",
        "",
    ]
    lines += [f"  {name:<6} {text}" for name, (_, text) in sub_verbs.items()]
    if argv and argv[0] not in ("-h", "--help"):
        lines.insert(0, f"craftvla {verb}: unknown sub-verb {argv[0]!r}")
    print("\n".join(lines), file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


def _usage() -> str:
    lines = ["usage: craftvla <verb> [--flag value ...]   (craftvla <verb> --help for flags)", "", "verbs:"]
    lines += [f"  {verb:<9} {text}" for verb, (_, text) in VERBS.items()]
    return "\n".join(lines)


def _message(err: CraftVLAError) -> str:
    """The error's one-line message. An error raised in a DataLoader worker comes back re-raised
    with the worker's traceback in its text (torch's ExceptionWrapper): keep only our line."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(f"{type(err).__name__}: ", 1)[-1]
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"craftvla: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    try:
        return int(module.main(rest) or 0)
    except CraftVLAError as err:
        print(f"craftvla {verb}: error: {_message(err)}", file=sys.stderr)
        return 1
    except SystemExit as err:  # `--help` printed the verb's flags
        return err.code if isinstance(err.code, int) else 0
    except KeyboardInterrupt:
        print(f"craftvla {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
