"""A small, strict safetensors reader that streams tensors into place.

Why not ``safetensors.safe_open``: it memory-maps the file, and the mapped pages count in the process's
resident memory on top of the copies we make when stacking experts (about 2x the file size at peak).
Reading each tensor with ``readinto`` straight into its final storage keeps the peak near 1x, and
parsing the header ourselves lets us name the exact key when a file is truncated or corrupt.
Writing uses the ``safetensors`` package.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from .errors import FormatError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES.update({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str) -> SafetensorsHeader:
    """Parse and validate a safetensors header (no tensor data is read)."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{name}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise FormatError(
                    f"{name}: not a safetensors file, or truncated (header length {n}, file {size} bytes)"
                )
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{name}: cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{name}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise FormatError(f"{name}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{name}: corrupt safetensors metadata (must map strings to strings)")
    data_start = 8 + n
    tensors = {}
    for key, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{name}: corrupt header entry for tensor {key!r} ({e!r})") from e
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != numel * itemsize or begin < 0:
            raise FormatError(f"{name}: tensor {key!r} has {end - begin} bytes for shape {shape}")
        if data_start + end > size:
            raise FormatError(
                f"{name}: truncated: tensor {key!r} ends at byte {data_start + end} but the file has "
                f"{size} bytes. Download the file again."
            )
        tensors[key] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
    return SafetensorsHeader(path, tensors, dict(metadata))


class TensorReader:
    """Reads tensors of one safetensors file by key, each straight into its destination."""

    def __init__(self, header: SafetensorsHeader):
        self.header = header
        self._file = open(header.path, "rb")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._file.close()

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (contiguous, CPU, same dtype and numel) with tensor ``key``."""
        info = self.header.tensors[key]
        if out.dtype != info.dtype or out.numel() != _numel(info.shape) or not out.is_contiguous():
            raise FormatError(f"{key}: destination does not fit {info.dtype} {info.shape}")
        if info.nbytes:
            self._file.seek(info.begin)
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            got = self._file.readinto(view)
            if got != info.nbytes:
                raise FormatError(f"{os.path.basename(self.header.path)}: truncated while reading {key!r}")
        return out

    def read(self, key: str) -> torch.Tensor:
        info = self.header.tensors[key]
        return self.read_into(key, torch.empty(info.shape, dtype=info.dtype)).view(info.shape)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def load_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file."""
    header = read_header(path)
    with TensorReader(header) as reader:
        return {k: reader.read(k) for k in header.tensors}, header.metadata
