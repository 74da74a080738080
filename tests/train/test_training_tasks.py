"""A trained checkpoint records its training data's instructions (a fine-tune: its start's too), so
evaluation can say which tasks it saw."""

import json

from craftvla.train.loop import train
from tests.train.conftest import train_config

STEP = ["--steps", "1", "--batch_size", "2"]


def _tasks(run):
    return json.loads((run / "checkpoints" / "last" / "processor.json").read_text())["training_tasks"]


def test_training_tasks_are_the_datasets_then_accumulate_over_fine_tuning(tiny_dataset, tmp_path):
    from craftvla.train.config import parse_train_config

    fresh = tmp_path / "fresh"
    train(train_config(fresh, "--dataset.root", str(tiny_dataset), *STEP))
    assert _tasks(fresh) == ["close the drawer", "open the door"]

    start = fresh / "checkpoints" / "last"
    meta = json.loads((start / "processor.json").read_text())
    (start / "processor.json").write_text(json.dumps({**meta, "training_tasks": ["press the button"]}))
    tuned = tmp_path / "tuned"
    quiet = ["--log.progress", "false", "--log.plots", "false"]
    train(
        parse_train_config(
            ["--init_from", str(start), "--dataset.root", str(tiny_dataset), "--output_dir", str(tuned), *STEP, *quiet]
        )
    )
    assert _tasks(tuned) == ["close the drawer", "open the door", "press the button"]

    (start / "processor.json").write_text(json.dumps({**meta, "training_tasks": None}))  # an older checkpoint
    unknown = tmp_path / "unknown"
    train(
        parse_train_config(
            [
                "--init_from",
                str(start),
                "--dataset.root",
                str(tiny_dataset),
                "--output_dir",
                str(unknown),
                *STEP,
                *quiet,
            ]
        )
    )
    assert _tasks(unknown) is None  # the start's tasks are unknown, so the fine-tune's are too
