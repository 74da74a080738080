"""CRaFT: constrained representation fine-tuning.

config.py       CraftConfig (the --craft.* flags)
functional.py   pure tensor functions (pooling, retention loss, surgery, dual update)
targets.py      what is retained (pooled / tokens / actions) and its fixed-length extraction for caches
data.py         anchor data: the anchor dataset, its step-positioned stream, calibration batches
providers.py    the initial model's targets: online (the initial weights, default) or from a cache
cache.py        the anchor cache on disk: format, metadata, model fingerprint, reader
cache_build.py  `craftvla cache build`: the teacher's targets over an anchor dataset, resumable
plugin.py       CraftPlugin, the object train_step calls, and build_craft_plugin
"""

from craftvla.craft.config import CraftConfig

__all__ = ["CraftConfig", "CraftPlugin", "build_craft_plugin"]


def __getattr__(name):  # lazy: the plug-in pulls in the model stack
    if name in ("CraftPlugin", "build_craft_plugin"):
        from craftvla.craft import plugin

        return getattr(plugin, name)
    raise AttributeError(f"module 'craftvla.craft' has no attribute {name!r}")
