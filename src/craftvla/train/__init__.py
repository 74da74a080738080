"""Training: `craftvla train` (loop.py), checkpoints (state.py), optimizers, LoRA / freezing, plots.

Import the pieces from their modules (`from craftvla.train.loop import train_step`); this package
file stays empty of imports so `import craftvla.train.config` does not pull in Accelerate.
"""
