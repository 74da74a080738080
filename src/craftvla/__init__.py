"""craftvla: VLA-Adapter-style policies, CRaFT fine-tuning, vision-token pruning, closed-loop eval."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import craftvla.data` must not pull in transformers
    if name == "VLAConfig":
        from craftvla.config import VLAConfig

        return VLAConfig
    if name == "VLAPolicy":
        from craftvla.model.policy import VLAPolicy

        return VLAPolicy
    raise AttributeError(f"module 'craftvla' has no attribute {name!r}")


__all__ = ["VLAConfig", "VLAPolicy", "__version__"]
