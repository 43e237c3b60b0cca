"""Minimal safetensors reader/writer (no safetensors package needed).

    write(path, tensors, metadata=None)  tensors: dict name -> torch.Tensor | np.ndarray,
                                         metadata: dict str -> str (stored as "__metadata__")
    read(path) -> (dict name -> torch.Tensor, metadata dict)

File layout: u64 little-endian header length N, N bytes of JSON header (padded with spaces to
a multiple of 8), then the raw little-endian tensor data. Data offsets are contiguous, in the
order the tensors were given. Supported dtypes: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL.
Writes are atomic (atomic_file.atomic_open): a temp file in the same directory, then os.replace.
"""
import json
import os
import struct
import sys

import numpy as np
import torch

from atomic_file import atomic_open

if sys.byteorder != "little":  # raw bytes below are written in native order
    raise ImportError("safetensors_io: big-endian hosts are not supported")

# safetensors name -> (torch dtype, numpy dtype used for the raw bytes)
_DTYPES = {
    "F64": (torch.float64, np.float64),
    "F32": (torch.float32, np.float32),
    "F16": (torch.float16, np.float16),
    "BF16": (torch.bfloat16, np.int16),      # no numpy bf16: move the raw 16-bit patterns
    "I64": (torch.int64, np.int64),
    "I32": (torch.int32, np.int32),
    "I16": (torch.int16, np.int16),
    "I8": (torch.int8, np.int8),
    "U8": (torch.uint8, np.uint8),
    "BOOL": (torch.bool, np.bool_),
}
_TORCH_TO_NAME = {v[0]: k for k, v in _DTYPES.items()}


def _as_tensor(name, value):
    if isinstance(value, np.ndarray):
        if value.dtype.byteorder == ">":
            value = value.astype(value.dtype.newbyteorder("<"))
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"safetensors write: {name}: expected torch.Tensor or numpy array, "
                        f"found {type(value).__name__}")
    if value.dtype not in _TORCH_TO_NAME:
        raise TypeError(f"safetensors write: {name}: unsupported dtype {value.dtype}")
    return value.detach().cpu().contiguous()


def _raw_bytes(t):
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def write(path, tensors, metadata=None):
    """Write `tensors` (ordered dict-like) and string `metadata` to `path` atomically."""
    items = [(str(k), _as_tensor(k, v)) for k, v in tensors.items()]
    header = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"safetensors write: metadata {k!r}: keys and values must be str")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, t in items:
        if name == "__metadata__":
            raise ValueError("safetensors write: '__metadata__' is not a valid tensor name")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _TORCH_TO_NAME[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((-len(hjson)) % 8)

    with atomic_open(path) as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for _, t in items:
            f.write(_raw_bytes(t))


def read_header(path):
    """-> (header dict without __metadata__, metadata dict, data start offset)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} exceeds file size {size}")
        header = json.loads(f.read(n).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + n


def read(path):
    """Read a safetensors file -> (dict name -> torch.Tensor (file order), metadata dict)."""
    header, metadata, start = read_header(path)
    size = os.path.getsize(path) - start
    # memory-mapped: only one copy of each tensor is made, never the whole file
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start) if size > 0 else b""
    out = {}
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dt = info.get("dtype")
        if dt not in _DTYPES:
            raise ValueError(f"{path}: {name}: unsupported dtype {dt!r}")
        tdt, ndt = _DTYPES[dt]
        shape = [int(s) for s in info["shape"]]
        b, e = info["data_offsets"]
        count = int(np.prod(shape)) if shape else 1
        if e - b != count * np.dtype(ndt).itemsize or b < 0 or e > size:
            raise ValueError(f"{path}: {name}: data_offsets [{b},{e}] do not match shape "
                             f"{shape} {dt} (data size {size})")
        arr = np.frombuffer(data[b:e], dtype=ndt, count=count).reshape(shape).copy()
        t = torch.from_numpy(arr)
        if tdt == torch.bfloat16:
            t = t.view(torch.bfloat16)
        out[name] = t
    return out, metadata
