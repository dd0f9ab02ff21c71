"""Reading and writing safetensors files with numpy (bf16 through ml_dtypes), with errors that name the file.

Our own reader rather than safetensors.numpy: numpy has no bfloat16, and a truncated or corrupt file must fail
with the file and tensor named instead of a bare Rust panic.
"""

import json
import os
import pathlib
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class CheckpointError(ValueError):
  """A weights file or folder that cannot be used; the message names it."""


def refuse_pickle(path: pathlib.Path):
  raise CheckpointError(
      f"{path}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run arbitrary code when loaded and are "
      "refused. Convert it to .safetensors first (e.g. with the `safetensors` library from a trusted environment).")


def read_header(path: pathlib.Path) -> tuple[dict, int]:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > size - 8:
      raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header of {header_len} bytes, "
                            f"file of {size} bytes)")
    try:
      header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
  return header, 8 + header_len


def load_file(path, keys: set[str] | None = None) -> dict[str, np.ndarray]:
  """All (or the named) tensors of a safetensors file as numpy arrays, memory-mapped."""
  path = pathlib.Path(path)
  if path.suffix in PICKLE_SUFFIXES:
    refuse_pickle(path)
  header, data_start = read_header(path)
  size = os.path.getsize(path)
  buffer = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__" or (keys is not None and name not in keys):
      continue
    if info.get("dtype") not in DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    begin, end = info["data_offsets"]
    if data_start + end > size:
      raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end}, "
                            f"the file has {size} bytes")
    dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
    if (end - begin) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} {info['dtype']}")
    tensors[name] = buffer[data_start + begin:data_start + end].view(dtype).reshape(shape)
  return tensors


def read_metadata(path) -> dict:
  header, _ = read_header(pathlib.Path(path))
  return dict(header.get("__metadata__") or {})


def save_file(tensors: dict[str, np.ndarray], path, metadata: dict | None = None):
  """Writes tensors (numpy, any dtype in DTYPES) to a safetensors file, atomically."""
  path = pathlib.Path(path)
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if array.dtype not in NAMES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {array.dtype}")
    header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for array in arrays:
      f.write(array.tobytes())
  os.replace(tmp, path)
