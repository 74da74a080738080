"""The command line's parsing helpers: draccus with one-line errors and a clean --help, comma-separated
number lists, and the argv / YAML helpers `craftvla train` layers its config with (train/config.py).
Every verb parses its config dataclass with `parse_config`."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
from typing import Any, Optional

import draccus
import yaml

from craftvla.errors import ConfigError


def number_list(text: Optional[str], name: str, cast=float) -> list:
    """A comma-separated command-line list ("0.98,0.02") as numbers; empty / None -> []."""
    if text is None or not str(text).strip():
        return []
    try:
        return [cast(x) for x in str(text).split(",")]
    except ValueError:
        raise ConfigError(
            f"--{name}={text!r}: expected comma-separated {cast.__name__}s, e.g. "
            f"{'0.98,0.02' if cast is float else '1,2'}"
        ) from None


def parse_config(
    cls,
    config_path: Optional[str] = None,
    args: Optional[list[str]] = None,
    prog: Optional[str] = None,
    source: Optional[str] = None,
):
    """draccus.parse with its errors turned into one-line ConfigErrors (unknown keys, bad values).

    `--help` prints every flag with its comment under `usage: <prog>` and raises SystemExit(0),
    which the CLI turns into its return code; `prog` is the verb ("craftvla train"); `source`
    names where the values came from in error messages (default: config_path and the command line)."""
    args = list(args or [])
    if config_path is not None and not Path(config_path).is_file():
        raise ConfigError(f"config file not found: {config_path}")
    if "-h" in args or "--help" in args:
        _print_help(cls, config_path, args, prog)
    try:
        return draccus.parse(config_class=cls, config_path=config_path, args=args, prog=prog, exit_on_error=False)
    except SystemExit as err:
        if err.code in (0, None):  # --help was printed
            raise
        raise ConfigError(f"invalid command-line arguments {args}") from None
    except Exception as err:  # draccus: DecodingError, DraccusException, argparse.ArgumentError, ...
        source = source or (f"{config_path} and the command line" if config_path else "the command line")
        raise config_error(err, f"invalid {prog or 'config'} flags (from {source})") from None


# draccus lists a "--<section> str  Config file for <section>" flag for every nested dataclass: noise
# between the flags a user looks for (one entry, possibly wrapped onto a second line).
_SECTION_FILE_FLAG = re.compile(r"\n  --(?P<name>[\w.]+) str\s+Config file for [\w.]+ \(default: None\)")


def _print_help(cls, config_path: Optional[str], args: list[str], prog: Optional[str]) -> None:
    """draccus's --help text without the per-section config-file flags; raises SystemExit(0)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            draccus.parse(config_class=cls, config_path=config_path, args=args, prog=prog, exit_on_error=False)
        except SystemExit:
            pass
    text = out.getvalue()
    for name in set(_SECTION_FILE_FLAG.findall(text)):
        text = text.replace(f" [--{name} str]", "")
    text = re.sub(r"\n +\n(?= +\[)", "\n", text)  # usage lines emptied by the removal
    print(_SECTION_FILE_FLAG.sub("", text), end="")
    raise SystemExit(0)


def config_error(err: Exception, context: str) -> ConfigError:
    """draccus wraps __post_init__ errors ("Couldn't instantiate class ..."): surface ours."""
    cause = err
    while cause is not None and not isinstance(cause, ConfigError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return cause
    return ConfigError(f"{context}: " + " ".join(str(err).split()))  # one line


# ----- argv and YAML layers (craftvla train: preset or checkpoint, then YAML, then flags) ----------

FREE_FORM_KEYS = ("normalization",)  # mapping-valued fields (VLAConfig.normalization): replaced whole


def deep_merge(base: dict, update: dict) -> dict:
    """`update` merged into `base` key by key, recursively (YAML over a preset); free-form mappings
    (FREE_FORM_KEYS) are replaced whole."""
    out = dict(base)
    for key, value in update.items():
        both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = deep_merge(out[key], value) if both_dicts and key not in FREE_FORM_KEYS else value
    return out


def prescan(argv: list[str], flag: str) -> Optional[str]:
    """The value of `--flag v` / `--flag=v` in argv (draccus parses it again later)."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def read_yaml(path: str) -> dict:
    """A YAML config file's top-level mapping; a missing or malformed file is a ConfigError naming it."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    return data


def bare_bools(argv: list[str], fields: dict) -> list[str]:
    """A boolean flag given alone means true (`--resume` = `--resume true`); draccus wants a value."""
    flags = {f"--{key}" for key, value in flatten(fields).items() if isinstance(value, bool)}
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in flags and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


def explicit_fields(argv: list[str]) -> dict[str, list[str]]:
    """The dotted flags given on the command line by section: `--policy.llm.num_layers 8` ->
    {"policy": ["llm.num_layers"]}."""
    out: dict[str, list[str]] = {}
    for arg in argv:
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            section, path = arg[2:].split("=", 1)[0].split(".", 1)
            out.setdefault(section, []).append(path)
    return out


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"llm": {"num_layers": 4}} -> {"llm.num_layers": 4}; free-form mappings (normalization) stay whole."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in FREE_FORM_KEYS:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
