"""Masks between processes: the one message format of ranks (gather, broadcast) and fan-out tasks (files).

    mpirun -n 2 hpcprune prune ...                                   # rank 1 -> rank 0 -> every rank
    hpcprune prune ... --set fanout.backend=dask                     # task -> result file -> coordinator

A message is one JSON header line, then each mask's chunks in header order; a file of messages (a
fan-out task's masks) holds them one after another, so it is written and read one mask at a time. A mask travels as the
archive stores it: `hpcprune.archive.codec` chunks (deflate + fletcher32), compressed once by the
process that selected it, so rank 0 writes the chunks it receives as they are, and every receiver
checks the checksums when it unpacks. The header also carries each mask's kept count and a few
facts of the sender (a fan-out task's kept total and threshold), so no second format is needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from hpcprune.archive.codec import EncodedMask, decode_mask, encode_mask, packed_kept


@dataclass
class MaskMessage:
    masks: dict[str, tuple[EncodedMask, int]]  # tensor name -> (its chunks, kept weights), in sending order
    facts: dict[str, Any] = field(default_factory=dict)  # JSON values

    @classmethod
    def of_packed(cls, packed: Mapping[str, np.ndarray], **facts: Any) -> MaskMessage:
        """Compress and checksum packed masks (np.packbits bytes) for sending."""
        return cls({name: (encode_mask(bits), packed_kept(bits)) for name, bits in packed.items()}, facts)

    @classmethod
    def merged(cls, messages: Iterable[MaskMessage]) -> MaskMessage:
        """The masks of several messages (every rank's, say) as one; facts of the first."""
        masks: dict[str, tuple[EncodedMask, int]] = {}
        facts: dict[str, Any] | None = None
        for message in messages:
            masks.update(message.masks)
            facts = message.facts if facts is None else facts
        return cls(masks, facts or {})

    def packed(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The packed bits of `names` (default: all), checksums verified."""
        chosen = self.masks if names is None else [name for name in names if name in self.masks]
        return {name: decode_mask(self.masks[name][0]) for name in chosen}

    def to_bytes(self) -> bytes:
        return b"".join(self._pieces())

    def write_to(self, file: BinaryIO) -> None:
        """Append this message to a file of messages."""
        for piece in self._pieces():
            file.write(piece)

    def _pieces(self) -> Iterator[bytes]:
        entries = [[name, kept, encoded.nbytes, encoded.chunk_bytes, [len(chunk) for chunk in encoded.chunks]]
                   for name, (encoded, kept) in self.masks.items()]
        yield json.dumps({"facts": self.facts, "masks": entries}).encode() + b"\n"
        for encoded, _ in self.masks.values():
            yield from encoded.chunks

    @classmethod
    def read_from(cls, file: BinaryIO) -> MaskMessage | None:
        """The next message of a file of messages; None at its end."""
        header = file.readline()
        if not header:
            return None
        described = json.loads(header)
        lengths = [length for *_, chunk_lengths in described["masks"] for length in chunk_lengths]
        body = file.read(sum(lengths))
        if len(body) != sum(lengths):
            raise ValueError(f"mask message: {sum(lengths) - len(body)} bytes missing at the end of the file")
        return cls.from_bytes(header + body)

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskMessage:
        header, _, body = bytes(data).partition(b"\n")
        described = json.loads(header)
        masks, offset = {}, 0
        for name, kept, nbytes, chunk_bytes, lengths in described["masks"]:
            chunks = []
            for length in lengths:
                chunks.append(body[offset:offset + length])
                offset += length
            masks[name] = (EncodedMask(nbytes, chunk_bytes, chunks), kept)
        if offset != len(body):
            raise ValueError(f"mask message: {len(body) - offset} bytes beyond the masks its header lists")
        return cls(masks, described["facts"])


def read_messages(file: BinaryIO) -> Iterator[MaskMessage]:
    """The messages of a file of messages, one read at a time."""
    while (message := MaskMessage.read_from(file)) is not None:
        yield message
