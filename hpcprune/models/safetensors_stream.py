"""safetensors files written one tensor at a time, so that a shard of an LLM never sits whole in memory.

    hpcprune export runs/llm.h5 --format hf --out pruned/     # writes its shards through this
    hpcprune prune ... --set fanout.backend=dask              # a module's weights for the tasks, too

Hand-written on purpose: safetensors' own writers (`save_file`, `save`) take every tensor of a file
as one dict in memory, and a shard of a large model is gigabytes. The format is small and
documented: an 8-byte little-endian header length, a JSON header that gives each tensor's dtype,
shape and byte range (`data_offsets`, relative to the end of the header) plus `__metadata__`, then
the tensors' bytes back to back in header order, little-endian, C order. So the header is written
from the shapes and dtypes alone, and each tensor's bytes follow as soon as the caller has made it.
The header is padded with spaces to a multiple of 8 bytes, as safetensors itself does, so that
every tensor starts aligned. Files are read back with safetensors' own `safe_open` (the tests do).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hpcprune.archive.atomic import replace_atomically

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
"""torch dtype -> its name in a safetensors header."""
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What the header says of one tensor, before its values exist."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def header(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """The length prefix and JSON header of a file holding `specs` in this order."""
    entries: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for spec in specs:
        entries[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_streamed(path: str | Path, specs: Sequence[TensorSpec], make: Callable[[TensorSpec], torch.Tensor],
                   metadata: Mapping[str, str]) -> int:
    """Write `specs` to `path` (atomically), asking `make(spec)` for each tensor in turn; returns the data bytes."""
    written = 0
    with replace_atomically(path) as temporary, open(temporary, "wb") as file:
        file.write(header(specs, metadata))
        for spec in specs:
            tensor = make(spec)
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(f"{spec.name}: made {tensor.dtype} {tuple(tensor.shape)}, the header says "
                                 f"{spec.dtype} {spec.shape}")
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            file.write(memoryview(data))
            written += data.nbytes
    return written
