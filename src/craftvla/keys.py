"""Batch and observation keys: the one home of every name shared between modules.

Spelled as LeRobot spells them (`lerobot/utils/constants.py`), so datasets, batches and
observations read the same in both libraries.
"""

IMAGE_PREFIX = "observation.images."  # + camera name: (3, H, W) float in [0, 1] in batches
STATE_KEY = "observation.state"  # proprioception (S,)
ACTION_KEY = "action"  # (H, A) chunk in batches
ACTION_PAD_KEY = "action_is_pad"  # (H,) bool: steps past the episode's end
TASK_KEY = "task"  # the natural-language instruction (LeRobot's "task" string)
TOKENS_KEY = "observation.language.tokens"  # (T,) instruction token ids, right-padded
TOKENS_MASK_KEY = "observation.language.attention_mask"  # (T,) bool: real instruction tokens

# Simulator observations (sim/) carry two more: the Meta-World task name and its raw vector.
ENV_TASK_KEY = "env_task"  # e.g. "drawer-close-v3" (the instruction is TASK_KEY)
RAW_OBS_KEY = "raw_obs"  # the full 39-D Meta-World observation (what the scripted experts read)

# Training batches from a dataset mixture (data/mixture.py) also carry each sample's source.
SOURCE_KEY = "source_index"  # () int: the sample's dataset, its position in --dataset.roots

# The environment variable holding the API key of `craftvla serve` (and of `eval --policy server`).
API_KEY_ENV = "CRAFTVLA_API_KEY"
