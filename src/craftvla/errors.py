"""The one exception type for expected failures (bad input, missing files, mismatches).

The CLI prints its message on one line and exits non-zero without a traceback; anything else
is a bug and keeps its traceback.
"""


class CraftVLAError(Exception):
    """A user-facing error: the message names the file, field or value at fault."""


class ConfigError(CraftVLAError, ValueError):
    """An invalid configuration value; the message names the field and the value."""


def require(ok: bool, name: str, value: object, why: str) -> None:
    """Raise ConfigError("name=value: why") unless `ok` (the config classes' validation)."""
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}")
