"""openpi's wire format: msgpack, with NumPy arrays as {__ndarray__, data, dtype, shape} maps.

The same encoding as `openpi_client.msgpack_numpy` (tests/serve check it against that package),
so openpi's `WebsocketClientPolicy` can talk to `craftvla serve`, and ours to an openpi server.
Only raw bytes plus a dtype string cross the wire: object, void and complex arrays are refused on
both sides, and nothing is unpickled.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from craftvla.errors import CraftVLAError

REFUSED_KINDS = ("V", "O", "c")  # void, object, complex: no safe raw-bytes form


def _encode(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in REFUSED_KINDS:
        raise CraftVLAError(f"cannot send a {obj.dtype} array (object, void and complex dtypes are refused)")
    if isinstance(obj, np.ndarray):
        return {
            b"__ndarray__": True,
            b"data": np.ascontiguousarray(obj).tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": obj.shape,
        }
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype, shape, data = _dtype(_field(obj, b"dtype")), _shape(_field(obj, b"shape")), _field(obj, b"data")
        if not isinstance(data, bytes) or len(data) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            size = len(data) if isinstance(data, bytes) else type(data).__name__
            raise CraftVLAError(f"array of shape {shape} and dtype {dtype} with {size} bytes")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        try:
            return _dtype(_field(obj, b"dtype")).type(_field(obj, b"data"))
        except (TypeError, ValueError, OverflowError):
            raise CraftVLAError("a NumPy scalar whose data does not fit its dtype") from None
    return obj


def _field(obj: dict, key: bytes) -> Any:
    if key not in obj:
        raise CraftVLAError(f"an encoded NumPy value without its {key.decode()!r} field")
    return obj[key]


def _shape(value) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in value):
        raise CraftVLAError(f"an array shape must be a list of non-negative integers, got {value!r:.60}")
    return tuple(value)


def _dtype(text) -> np.dtype:
    try:
        dtype = np.dtype(text.decode() if isinstance(text, bytes) else text)
    except (TypeError, ValueError):
        raise CraftVLAError(f"unknown dtype {text!r}") from None
    if dtype.kind in REFUSED_KINDS:
        raise CraftVLAError(f"refusing a {dtype} array (object, void and complex dtypes are not accepted)")
    return dtype


def pack(obj: Any) -> bytes:
    """A message (dicts, lists, numbers, strings, NumPy arrays) -> msgpack bytes."""
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """msgpack bytes -> the message; anything malformed is a CraftVLAError (a server answers it)."""
    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False)
    except CraftVLAError:
        raise
    except Exception as err:  # noqa: BLE001  msgpack raises assorted types (ExtraData, FormatError, ValueError, ...) on hostile bytes
        raise CraftVLAError(
            f"not a msgpack message ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
        ) from None
