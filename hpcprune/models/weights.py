"""Where the weights to score come from: the model in memory, or a safetensors checkpoint on disk.

    hpcprune prune --set model.name=checkpoint --set model.checkpoint=big.safetensors --set finetune.epochs=0

A `CheckpointWeights` reads one tensor at a time (open, read, close), so a rank holds only the
tensor it is scoring: a checkpoint larger than a rank's memory can still be scored and masked.
Its prunable tensors are the floating-point tensors of two or more dimensions named `*weight`.
"""

from __future__ import annotations

import json
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from hpcprune.errors import UsageError
from hpcprune.models.builders import require_finite

FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPES = {**FLOAT_DTYPES, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}


class Weights(Protocol):
    def get(self, name: str) -> torch.Tensor:
        """The tensor called `name` (a view of the live parameter, or a fresh copy from disk)."""


class ModelWeights:
    def __init__(self, model: nn.Module):
        self._parameters = dict(model.named_parameters())

    def get(self, name: str) -> torch.Tensor:
        return self._parameters[name].detach()


class CheckpointWeights:
    """A safetensors file read tensor by tensor with plain reads into two reused buffers.

    Plain reads at the header's offsets copy each tensor once from the page cache; mapping the file
    instead costs a page fault per 4 KiB and was four times slower here. `get` returns a view of a
    buffer, valid until the next `get`: scoring consumes it at once. Told the order of its reads
    (`read_ahead`), it reads the next tensor into the other buffer on a thread while the caller
    scores this one: a checkpoint larger than memory comes from disk, and a synchronous read would
    leave the rank idle for it (and two ranks sharing one disk idle longer). Passes go back and
    forth over that order (hpcprune.prune.streaming.Streamer), so the tensor after the last of a
    pass is that same tensor again. Memory: two of the largest tensor.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix != ".safetensors":
            raise UsageError(f"model.checkpoint {self.path}: model 'checkpoint' reads .safetensors files only")
        header, self._data_start = _read_header(self.path)
        _require_complete(self.path, header, self._data_start)
        self.shapes = {name: tuple(entry["shape"]) for name, entry in header.items()}
        self.dtypes = {name: entry["dtype"] for name, entry in header.items()}
        self._offsets = {name: tuple(entry["data_offsets"]) for name, entry in header.items()}
        self._buffers = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
        self._current = 0  # the buffer of the tensor `get` returned last
        self._order: list[str] = []  # the announced order of the reads
        self._position: dict[str, int] = {}  # tensor -> its place in that order
        self._last: int | None = None  # place of the tensor `get` returned last, if announced
        self._direction = 1  # of the pass going on: +1 forward, -1 back
        self._pending: tuple[str, Future] | None = None  # (tensor, its read into the other buffer)
        self._reader: ThreadPoolExecutor | None = None

    def prunable(self) -> list[tuple[str, tuple[int, ...]]]:
        """Floating tensors of 2+ dimensions named *weight, in name order (the order ties are broken in)."""
        return [(name, shape) for name, shape in sorted(self.shapes.items())
                if len(shape) >= 2 and self.dtypes[name] in FLOAT_DTYPES and name.endswith("weight")]

    def read_ahead(self, names: list[str]) -> None:
        """`get` will ask for `names` in this order, then in reverse, and so on: each call reads the next one ahead."""
        self._order = list(names) if len(names) > 1 else []
        self._position = {name: place for place, name in enumerate(self._order)}
        self._last, self._direction = None, 1

    def get(self, name: str) -> torch.Tensor:
        raw = self._take(name)
        following = self._following(name)
        if following is not None:
            self._pending = (following, self._pool().submit(self._read_into, following, 1 - self._current))
        tensor = raw.view(DTYPES[self.dtypes[name]]).view(self.shapes[name])
        require_finite(tensor, f"checkpoint {self.path}: tensor {name!r}")
        return tensor

    def _following(self, name: str) -> str | None:
        """The tensor the caller will most likely ask for after `name`, going on the way it is going."""
        place = self._position.get(name)
        if place is None:
            return None
        if self._last is not None:
            # The same tensor twice: a pass ended here and the next turned back; else the step's sign.
            self._direction = -self._direction if place == self._last else (1 if place > self._last else -1)
        self._last = place
        following = place + self._direction
        return self._order[following] if 0 <= following < len(self._order) else name

    def _take(self, name: str) -> torch.Tensor:
        """`name`'s bytes in buffer self._current: the read ahead if it was this tensor, else a read now."""
        if self._pending is not None:
            ahead, read = self._pending
            self._pending = None
            if ahead == name:  # its error, if any, is this call's
                self._current = 1 - self._current
                return read.result()
            try:
                read.result()  # the other buffer is settled before anything reuses it
            except UsageError:
                pass  # a tensor not asked for after all: its problem is reported if it ever is
        return self._read_into(name, self._current)

    def _read_into(self, name: str, slot: int) -> torch.Tensor:
        start, end = self._offsets[name]
        if self._buffers[slot].numel() < end - start:
            self._buffers[slot] = torch.empty(end - start, dtype=torch.uint8)
        raw = self._buffers[slot][: end - start]
        with open(self.path, "rb", buffering=0) as checkpoint:
            checkpoint.seek(self._data_start + start)
            if checkpoint.readinto(memoryview(raw.numpy())) != end - start:
                raise UsageError(f"checkpoint {self.path} is truncated: tensor {name} is incomplete")
        return raw

    def _pool(self) -> ThreadPoolExecutor:
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpcprune-read-ahead")
        return self._reader


def _require_complete(path: Path, header: dict, data_start: int) -> None:
    """Every tensor's bytes must lie inside the file: a truncated copy is refused before anything is scored."""
    ends = [(entry["data_offsets"][1], name) for name, entry in header.items()]
    end, name = max(ends, default=(0, None))
    size = path.stat().st_size
    if data_start + end > size:
        raise UsageError(f"checkpoint {path} is truncated: {size} bytes, but its header places tensor {name} "
                         f"up to byte {data_start + end}")


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header (name -> dtype, shape, data_offsets) and where the data begins."""
    try:
        with open(path, "rb") as checkpoint:
            length = struct.unpack("<Q", checkpoint.read(8))[0]
            header = json.loads(checkpoint.read(length))
    except (OSError, struct.error, ValueError) as error:
        raise UsageError(f"cannot read checkpoint {path}: not a safetensors file ({error})") from None
    header.pop("__metadata__", None)
    return header, 8 + length
