"""CRaFT: constrained representation fine-tuning.

functional.py  pure tensor functions (pooling, retention loss, surgery, dual update)
config.py      CraftConfig (the --craft.* flags)
anchors.py     anchor providers: online (the initial weights, default) and the anchor-dataset streams
cache.py       offline anchor caches (`craftvla cache build`) and their provider
targets.py     what is retained: pooled bridge features, per-token states, the policy's own actions
plugin.py      CraftPlugin, the object train_step calls
"""

from craftvla.craft.config import CraftConfig

__all__ = ["CraftConfig", "CraftPlugin"]


def __getattr__(name):  # lazy: the plug-in pulls in the model stack
    if name == "CraftPlugin":
        from craftvla.craft.plugin import CraftPlugin

        return CraftPlugin
    raise AttributeError(f"module 'craftvla.craft' has no attribute {name!r}")
