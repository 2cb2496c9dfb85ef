"""`hpcprune inspect masks`: one round's masks as a safetensors file of bool tensors.

    hpcprune inspect masks runs/quickstart.h5 --round 3 --out masks.safetensors

The file is what any safetensors reader expects (`safetensors.torch.load_file` gives a dict of bool
tensors, True = kept, named like the model's parameters). It is written tensor by tensor: the
header is known from the per-layer table before any mask is read, then each mask is unpacked, written
and dropped, so memory follows the largest tensor (numel bytes), not the model. The file appears
under its name only once complete.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from hpcprune.archive.atomic import refuse_existing, replace_atomically
from hpcprune.archive.reader import complete_round, open_archive, refuse_writing_over

ALIGNMENT = 8  # safetensors pads its header with spaces so that the data starts aligned


def export_masks(path: str | Path, out: str | Path, round_index: int | None = None, *,
                 force: bool = False) -> dict[str, Any]:
    """Write round `round_index`'s masks (None: the last complete round) to `out`; returns what was written."""
    reader = open_archive(path)
    refuse_writing_over(reader, out)
    refuse_existing(out, force)
    index = complete_round(reader, round_index)["index"]
    shapes = reader.shapes()
    header, offset = {}, 0
    for layer in reader.layers(index):  # the masks' order: the data follows the header in this order
        header[layer["name"]] = {"dtype": "BOOL", "shape": list(shapes[layer["name"]]),
                                 "data_offsets": [offset, offset + layer["numel"]]}
        offset += layer["numel"]
    names = list(header)
    header["__metadata__"] = {"archive": Path(path).name, "round": str(index)}
    out = Path(out)
    with replace_atomically(out) as temporary, open(temporary, "wb") as file:
        _write_header(file, header)
        for expected, (name, packed, shape) in zip(names, reader.iter_packed_masks(index), strict=True):
            assert name == expected, f"round {index}: mask {name} where the per-layer table has {expected}"
            bits = np.unpackbits(packed, count=int(np.prod(shape)), bitorder="big")  # 0/1 bytes: safetensors BOOL
            file.write(bits.tobytes())
    return {"archive": str(path), "round": index, "out": str(out), "tensors": len(names), "bytes": offset}


def _write_header(file, header: dict[str, Any]) -> None:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % ALIGNMENT)
    file.write(struct.pack("<Q", len(encoded)) + encoded)
