"""Sparse storage of masked tensors: bitmask + packed values, or CSR where that is smaller.

    hpcprune export runs/quickstart.h5 --format sparse --out model.sparse.safetensors

Each masked tensor is written in the smallest of three encodings, chosen per tensor:

- `bitmask`: `<name>::mask`, np.packbits of the flat mask (numel/8 bytes, first element in the
  highest bit, as in the archive), and `<name>::values`, the kept values in row-major order;
- `csr`: the tensor viewed as (dim 0) x (the rest): `<name>::crow` row offsets, `<name>::col` column
  of each kept value (int16 when the rows are short enough, else int32), `<name>::values`;
- `dense`: the tensor itself, when neither encoding saves bytes (a nearly dense layer).

Unmasked tensors (biases, BatchNorm) are stored as they are. The encodings follow the mask, not the
values: a kept weight that happens to be 0.0 is stored, so decoding restores every tensor bit for
bit. The safetensors metadata `hpcprune.sparse` maps each tensor to its encoding, shape and dtype.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping

import torch

from hpcprune.archive.codec import pack_mask, unpack_mask

METADATA_KEY = "hpcprune.sparse"
SEPARATOR = "::"  # cannot occur in a parameter name: "." and "/" do, ":" never


def encode_sparse(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                  only: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) to write with safetensors; `masks` covers the prunable tensors of `state`.

    Each masked tensor gets its smallest encoding, or `only` that one (one of `PARTS`).
    """
    tensors: dict[str, torch.Tensor] = {}
    layout = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        encoding, parts = _smallest_encoding(tensor, masks.get(name), only)
        tensors.update({f"{name}{SEPARATOR}{part}": value for part, value in parts.items()})
        layout[name] = {"encoding": encoding, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    return tensors, {METADATA_KEY: json.dumps(layout)}


def decode_sparse(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The dense tensors `encode_sparse` was given, bit for bit, in their original order."""
    layout = json.loads(metadata[METADATA_KEY])
    state = {}
    for name, entry in layout.items():
        parts = {part: tensors[f"{name}{SEPARATOR}{part}"] for part in PARTS[entry["encoding"]]}
        state[name] = DECODERS[entry["encoding"]](parts, tuple(entry["shape"]), getattr(torch, entry["dtype"]))
    return state


def encoding_counts(metadata: Mapping[str, str]) -> dict[str, int]:
    """How many tensors use each encoding (for the export's report)."""
    counts: dict[str, int] = {}
    for entry in json.loads(metadata[METADATA_KEY]).values():
        counts[entry["encoding"]] = counts.get(entry["encoding"], 0) + 1
    return counts


# --- encodings -------------------------------------------------------------------------------


def _smallest_encoding(tensor: torch.Tensor, mask: torch.Tensor | None, only: str | None) -> tuple[str, dict[str, torch.Tensor]]:
    candidates = {"dense": {"dense": tensor}}
    if mask is not None:
        candidates["bitmask"] = _bitmask(tensor, mask)
        if tensor.dim() >= 1 and tensor.numel():
            candidates["csr"] = _csr(tensor, mask)
        if only is not None:
            return only, candidates[only]
    # Ties go to the first candidate: dense, then bitmask, then CSR (the simpler reader).
    return min(candidates.items(), key=lambda item: sum(part.nbytes for part in item[1].values()))


def _bitmask(tensor: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"mask": torch.from_numpy(pack_mask(mask)), "values": tensor[mask].contiguous()}


def _csr(tensor: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    rows = mask.reshape(tensor.shape[0], -1)
    columns = rows.shape[1]
    kept_per_row = rows.sum(dim=1, dtype=torch.int64)
    crow = torch.zeros(rows.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(kept_per_row, dim=0, out=crow[1:])
    col = rows.nonzero()[:, 1]  # row-major order, the order of tensor[mask]
    return {
        "crow": crow.to(_index_dtype(int(crow[-1]))),
        "col": col.to(_index_dtype(columns - 1)),
        "values": tensor.reshape(rows.shape)[rows].contiguous(),
    }


def _index_dtype(largest: int) -> torch.dtype:
    return torch.int16 if largest <= torch.iinfo(torch.int16).max else torch.int32 if largest <= torch.iinfo(torch.int32).max else torch.int64


def _decode_dense(parts, shape, dtype) -> torch.Tensor:
    return parts["dense"]


def _decode_bitmask(parts, shape, dtype) -> torch.Tensor:
    mask = unpack_mask(parts["mask"].numpy(), shape)
    dense = torch.zeros(shape, dtype=dtype)
    dense[mask] = parts["values"]
    return dense


def _decode_csr(parts, shape, dtype) -> torch.Tensor:
    rows, columns = shape[0], math.prod(shape[1:])
    crow = parts["crow"].to(torch.int64)
    row_of_value = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
    dense = torch.zeros(rows, columns, dtype=dtype)
    dense[row_of_value, parts["col"].to(torch.int64)] = parts["values"]
    return dense.reshape(shape)


# Adding an encoding is one entry in each table.
PARTS: dict[str, tuple[str, ...]] = {"dense": ("dense",), "bitmask": ("mask", "values"), "csr": ("crow", "col", "values")}
DECODERS: dict[str, Callable[[dict[str, torch.Tensor], tuple[int, ...], torch.dtype], torch.Tensor]] = {
    "dense": _decode_dense, "bitmask": _decode_bitmask, "csr": _decode_csr,
}


def dense_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors themselves, stored dense (the reference a sparse file is compared to)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())

