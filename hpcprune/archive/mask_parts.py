"""A round's masks in their own HDF5 files, each written once and never changed, linked from the archive.

    hpcprune prune --config configs/quickstart.yaml   # run.h5.masks/round-0001.part-0000.h5, linked from run.h5

Why beside the archive: an update of the archive is made on a copy (`hpcprune.archive.update`), so
whatever the archive holds is copied again by every update; with the masks inside, each update cost
the masks of every round before it. A part file is written once under a temporary name and renamed
into place (`hpcprune.archive.atomic`); then one small update of the archive adds an HDF5 external
link per mask: `/rounds/0001/masks/fc1.weight` -> `run.h5.masks/round-0001.part-0000.h5:/fc1.weight`.
HDF5 looks for a relative link target in the archive's own folder before the working directory, so
plain h5py, h5dump and HDFView read `f["rounds/0001/masks/fc1.weight"]` as before, from anywhere,
and after the run folder was moved.

A round is usually one part. A pipeline that records a round in steps (block by block) writes one
part per step (`Archive.add_masks`): each step costs what it writes, and a step killed half-way
leaves at most a part that nothing links to, which the next step with its number replaces.

Each mask is a root dataset of its part, named as in the archive (`escape_name`), holding the
packed bits in `hpcprune.archive.codec` chunks (gzip + fletcher32, written as they are with HDF5's
direct chunk write), attrs name, shape and kept. Masks come from an iterator and are written one
at a time, so memory holds one mask, whatever the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from hpcprune.archive.atomic import replace_atomically
from hpcprune.archive.codec import EncodedMask, encode_mask
from hpcprune.progress import bar

PART_FORMAT = "hpcprune-masks"

MaskEntry = tuple["np.ndarray | EncodedMask", Sequence[int], int]  # packed bits or their chunks, shape, kept
Masks = Mapping[str, MaskEntry] | Iterable[tuple[str, MaskEntry]]


def escape_name(name: str) -> str:
    """A tensor name as an HDF5 link name ("/" would open a subgroup)."""
    return name.replace("%", "%25").replace("/", "%2F")


def unescape_name(name: str) -> str:
    return name.replace("%2F", "/").replace("%25", "%")


def write_part(path: Path, masks: Masks, *, round_index: int, progress: bool = False,
               total: int | None = None) -> list[str]:
    """Write `masks` (tensor name -> (bits, shape, kept), a mapping or an iterator of pairs) into a
    new part file at `path`, which appears whole or not at all; returns the tensor names in order.
    `total`: how many an iterator will give (for the progress bar)."""
    entries = masks.items() if isinstance(masks, Mapping) else masks
    total = len(masks) if isinstance(masks, Mapping) else total
    written = []
    with replace_atomically(path) as temporary, h5py.File(temporary, "w", track_order=True) as part:
        part.attrs.update(format=PART_FORMAT, round=round_index)
        for tensor, (mask, shape, kept) in bar(entries, enabled=progress, total=total,
                                               description=f"round {round_index}: write", unit="mask"):
            _write_mask(part, tensor, mask, tuple(int(size) for size in shape), kept)
            written.append(tensor)
    return written


def link_masks(group: h5py.Group, part: str, tensors: Iterable[str]) -> None:
    """Link each of `tensors` from `group` to its dataset in `part` (a path relative to the archive's folder)."""
    for tensor in tensors:
        group[escape_name(tensor)] = h5py.ExternalLink(part, f"/{escape_name(tensor)}")


def linked_parts(group: h5py.Group) -> set[str]:
    """The part files (as linked) that the masks of `group` live in; inline masks (format 1) have none."""
    links = (group.get(name, getlink=True) for name in group)
    return {link.filename for link in links if isinstance(link, h5py.ExternalLink)}


def _write_mask(part: h5py.File, tensor: str, mask: np.ndarray | EncodedMask, shape: tuple[int, ...], kept: int) -> None:
    encoded = mask if isinstance(mask, EncodedMask) else encode_mask(mask)
    expected = (math.prod(shape) + 7) // 8
    if encoded.nbytes != expected:
        raise ValueError(f"mask {tensor}: {encoded.nbytes} packed bytes for shape {shape} (expected {expected})")
    # An empty tensor still gets the same filters; HDF5 then needs an extendible shape to hold one chunk.
    dataset = part.create_dataset(escape_name(tensor), shape=(encoded.nbytes,), dtype=np.uint8,
                                  chunks=(encoded.chunk_bytes,), compression="gzip", fletcher32=True,
                                  maxshape=None if encoded.nbytes else (None,))
    for position, chunk in enumerate(encoded.chunks):  # already compressed and checksummed (codec)
        dataset.id.write_direct_chunk((position * encoded.chunk_bytes,), chunk)
    dataset.attrs.update(name=tensor, shape=np.array(shape, dtype=np.int64), kept=int(kept))
