"""Read RLDS datasets (TFDS TFRecord shards) without TensorFlow.

A TFDS dataset directory holds dataset_info.json (splits, shard lengths, the file-name template),
features.json (the feature tree: images with their encoding, tensors with dtype and shape, text)
and `<name>-<split>.tfrecord-NNNNN-of-NNNNN` shards. In an RLDS dataset every record is one
episode, a `tf.train.Example` whose keys flatten the tree with "/" ("steps/observation/image",
"steps/action", "episode_metadata/file_path"); the steps' values are concatenated per key.

TFRecord framing, per record: uint64 length, uint32 masked CRC32C of the length, the bytes,
uint32 masked CRC32C of the bytes (little-endian). Both CRCs are checked (google-crc32c, C).
The Example protobuf is parsed by hand (`parse_example`): four message types and three wire
types, so no protobuf schema or TensorFlow is needed. Images are decoded with Pillow.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from craftvla.errors import CraftVLAError
from craftvla.files import read_json

_MASK_DELTA = 0xA282EAD8


# ----- TFRecord framing -----------------------------------------------------------------------------


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_records(path: Path) -> Iterator[bytes]:
    """Every record of one TFRecord file, CRCs checked; a damaged file is a CraftVLAError naming it."""
    with open(path, "rb") as f:
        index = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise CraftVLAError(f"{path}: truncated after record {index} (a partial length header)")
            (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if _masked_crc(header[:8]) != length_crc:
                raise CraftVLAError(f"{path}: record {index}: length CRC mismatch (corrupt or not a TFRecord file)")
            data, footer = f.read(length), f.read(4)
            if len(data) < length or len(footer) < 4:
                raise CraftVLAError(f"{path}: record {index} truncated ({len(data)} of {length} bytes)")
            if _masked_crc(data) != struct.unpack("<I", footer)[0]:
                raise CraftVLAError(f"{path}: record {index}: data CRC mismatch (the shard is corrupt)")
            yield data
            index += 1


# ----- tf.train.Example, parsed by hand --------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CraftVLAError("protobuf: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a message: varints as ints, length-delimited as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        else:
            raise CraftVLAError(f"protobuf: unsupported wire type {wire}")
        yield number, wire, value


def _feature(buf: bytes) -> Any:
    """A Feature: bytes_list (1) -> list[bytes]; float_list (2) -> float32 array; int64_list (3) -> int64 array."""
    for number, _, body in _fields(buf):
        if number == 1:
            return [v for n, _, v in _fields(body) if n == 1]
        if number == 2:  # packed floats (wire 2) or one float per field (wire 5)
            parts = [v for n, _, v in _fields(body) if n == 1]
            return np.frombuffer(b"".join(parts), dtype="<f4").copy()
        if number == 3:
            values: list[int] = []
            for n, wire, v in _fields(body):
                if n != 1:
                    continue
                if wire == 0:
                    values.append(v)
                else:  # packed varints
                    pos = 0
                    while pos < len(v):
                        x, pos = _varint(v, pos)
                        values.append(x)
            return np.array(values, dtype=np.uint64).astype(np.int64)  # two's complement negatives
    return []


def parse_example(record: bytes) -> dict[str, Any]:
    """A serialized tf.train.Example -> {key: list[bytes] | float32 array | int64 array}."""
    out: dict[str, Any] = {}
    for number, _, features in _fields(record):
        if number != 1:
            continue
        for n, _, entry in _fields(features):  # map<string, Feature> entries
            if n != 1:
                continue
            key, value = None, None
            for m, _, part in _fields(entry):
                if m == 1:
                    key = part.decode()
                elif m == 2:
                    value = _feature(part)
            if key is not None:
                out[key] = value if value is not None else []
    return out


# ----- the dataset ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feature:
    """One leaf of features.json: kind image | tensor | text, with dtype and per-step shape."""

    key: str  # "steps/observation/image", ...
    kind: str
    dtype: str
    shape: tuple[int, ...]
    encoding: Optional[str] = None  # images: png | jpeg


def _leaves(node: dict, prefix: str) -> Iterator[Feature]:
    if "featuresDict" in node:
        for name, child in node["featuresDict"]["features"].items():
            yield from _leaves(child, f"{prefix}{name}/" if prefix or name else name)
    elif "sequence" in node:
        yield from _leaves(node["sequence"]["feature"], prefix)
    elif "image" in node:
        spec = node["image"]
        yield Feature(
            prefix.rstrip("/"),
            "image",
            spec.get("dtype", "uint8"),
            tuple(int(d) for d in spec["shape"]["dimensions"]),
            spec.get("encodingFormat", "png"),
        )
    elif "tensor" in node:
        spec = node["tensor"]
        if spec.get("encoding", "none") != "none":
            raise CraftVLAError(
                f"feature {prefix.rstrip('/')!r}: tensor encoding {spec['encoding']!r} is not supported"
            )
        yield Feature(
            prefix.rstrip("/"),
            "tensor",
            spec["dtype"],
            tuple(int(d) for d in spec.get("shape", {}).get("dimensions", [])),
        )
    elif "text" in node:
        yield Feature(prefix.rstrip("/"), "text", "string", ())
    else:
        raise CraftVLAError(f"feature {prefix.rstrip('/')!r}: unsupported TFDS feature {sorted(node)}")


class RldsDataset:
    """A TFDS/RLDS directory: `features`, `splits`, and `episodes(split)` yielding one dict per
    episode ({feature key: (T, ...) array or list of str}) read shard by shard, record by record."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.info = read_json(self.root / "dataset_info.json", expect=dict)
        tree = read_json(self.root / "features.json", expect=dict)
        self.features = {f.key: f for f in _leaves(tree, "")}
        if not any(k.startswith("steps/") for k in self.features):
            raise CraftVLAError(f"{self.root / 'features.json'}: no 'steps' sequence; not an RLDS dataset")
        self.name = self.info.get("name", self.root.parent.name)
        self.splits = {s["name"]: s for s in self.info.get("splits", [])}

    def shards(self, split: str) -> list[Path]:
        if split not in self.splits:
            raise CraftVLAError(f"{self.root}: no split {split!r}; it has {sorted(self.splits)}")
        count = len(self.splits[split].get("shardLengths", [])) or 1
        names = [f"{self.name}-{split}.tfrecord-{i:05d}-of-{count:05d}" for i in range(count)]
        missing = [n for n in names if not (self.root / n).is_file()]
        if missing:
            raise CraftVLAError(f"{self.root}: missing shard(s) {missing[:3]} of split {split!r}")
        return [self.root / n for n in names]

    def num_episodes(self, split: str) -> int:
        return sum(int(n) for n in self.splits[split].get("shardLengths", [])) or 0

    def episodes(self, split: str = "train", keys: Optional[list[str]] = None) -> Iterator[dict[str, Any]]:
        wanted = keys or list(self.features)
        for shard in self.shards(split):
            for record in read_records(shard):
                try:
                    yield self._decode(parse_example(record), wanted)
                except CraftVLAError as err:
                    raise CraftVLAError(f"{shard}: {err}") from None

    def _decode(self, example: dict[str, Any], keys: list[str]) -> dict[str, Any]:
        out = {}
        for key in keys:
            feature = self.features[key]
            if key not in example:
                raise CraftVLAError(f"record lacks feature {key!r} (features.json lists it)")
            out[key] = _decode_feature(feature, example[key])
        return out


def _decode_feature(feature: Feature, raw: Any) -> Any:
    if feature.kind == "text":
        return [v.decode() for v in raw]
    if feature.kind == "image":
        return np.stack([_decode_image(v, feature) for v in raw]) if raw else np.zeros((0, *feature.shape), np.uint8)
    dtype = np.dtype("bool" if feature.dtype == "bool" else feature.dtype)
    values = np.asarray(raw)
    per_step = int(np.prod(feature.shape)) if feature.shape else 1
    if values.size % per_step:
        raise CraftVLAError(f"feature {feature.key!r}: {values.size} values are not a multiple of {feature.shape}")
    return values.astype(dtype).reshape(-1, *feature.shape)


def _decode_image(data: bytes, feature: Feature) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
    except OSError as err:
        raise CraftVLAError(f"feature {feature.key!r}: undecodable {feature.encoding} image ({err})") from None
    if array.shape != feature.shape:
        raise CraftVLAError(
            f"feature {feature.key!r}: image of shape {array.shape}, features.json says {feature.shape}"
        )
    return array
