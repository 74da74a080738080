"""The README's "Run, serve and fine-tune a VLA-Adapter release" commands, as written, on the release
VLA-Adapter's own code wrote (tests/model/fixtures/vla_adapter/chain/release): $RELEASE is that
directory, data/* are LIBERO-like datasets written here, and training runs 2 steps."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from craftvla.model import released
from tests.model.test_vla_adapter_chain import CHAIN, reduced_base
from tests.train.test_init_from_release import write_libero_like

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """The section's bash block: one argv per `craftvla` command, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Run, serve and fine-tune a VLA-Adapter release") :]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith("craftvla ")]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setattr(released, "release_base", reduced_base)  # the fixture's reduced towers
    monkeypatch.chdir(tmp_path)
    for name in ("my_task", "libero_spatial"):
        write_libero_like(tmp_path / "data" / name)
    return tmp_path


def _argv(command: list[str]) -> list[str]:
    return [str(CHAIN / "release") if word == "$RELEASE" else word for word in command[1:]]


def test_the_readme_release_commands_run_as_written(workspace, capsys):
    from craftvla.cli import main
    from craftvla.model.policy import VLAPolicy
    from craftvla.serve.client import PolicyClient
    from craftvla.serve.server import ServeConfig
    from tests.serve.conftest import running_server

    commands = {c[1]: _argv(c) for c in readme_commands()}
    assert set(commands) == {"info", "serve", "train"}
    assert main(commands["info"]) == 0
    assert "will load: head vla_adapter (pro=True), chunk 8 x 7 actions" in capsys.readouterr().out

    # serve: what `craftvla serve` does with these flags (port 0: any free port), then one request
    from craftvla.cli.parsing import parse_config

    cfg = parse_config(ServeConfig, args=[*commands["serve"][1:], "--port", "0"])
    policy = VLAPolicy.from_pretrained(cfg.checkpoint).eval()
    rng = np.random.default_rng(0)
    obs = {k: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for k in policy.config.camera_keys}
    obs |= {"observation.state": rng.normal(size=8).astype(np.float32), "task": "Pick Up The Bowl"}
    with running_server(policy) as server, PolicyClient(f"ws://127.0.0.1:{server.port}") as client:
        np.testing.assert_allclose(client.actions(obs), policy.infer(obs), atol=1e-5)

    assert main([*commands["train"], "--steps", "2", "--batch_size", "2", "--log.progress", "false"]) == 0
    run = workspace / "runs" / "spatial_plus_my_task"
    tuned = VLAPolicy.from_pretrained(run / "checkpoints" / "last")
    assert tuned.config.head.type == "vla_adapter" and "craft/retention_loss" in (run / "metrics.jsonl").read_text()
    assert tuned.infer(obs).shape == (8, 7)
