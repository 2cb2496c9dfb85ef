"""Mask chunks encoded off rank 0 must be exactly what HDF5's own gzip + fletcher32 filters accept."""

import h5py
import numpy as np
import pytest

from hpcprune.archive.codec import encode_mask, fletcher32


@pytest.mark.parametrize("length", [1, 2, 719, 720, 721, 100_001])
def test_fletcher32_equals_the_checksum_hdf5_stores(tmp_path, length):
    data = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8)
    with h5py.File(tmp_path / "reference.h5", "w") as file:
        dataset = file.create_dataset("d", data=data, chunks=(length,), compression="gzip", fletcher32=True)
        _, stored = dataset.id.read_direct_chunk((0,))
    body, checksum = stored[:-4], stored[-4:]
    assert fletcher32(body).to_bytes(4, "little") == checksum


@pytest.mark.parametrize("bits", [1, 8, 8 * (1 << 18), 8 * (1 << 18) + 13, 5_000_003])
def test_encoded_chunks_read_back_through_plain_h5py(tmp_path, bits):
    packed = np.packbits(np.random.default_rng(bits).random(bits) > 0.7)
    encoded = encode_mask(packed)
    with h5py.File(tmp_path / "masks.h5", "w") as file:
        dataset = file.create_dataset("m", shape=(encoded.nbytes,), dtype=np.uint8, chunks=(encoded.chunk_bytes,),
                                      compression="gzip", fletcher32=True)
        for position, chunk in enumerate(encoded.chunks):
            dataset.id.write_direct_chunk((position * encoded.chunk_bytes,), chunk)
    with h5py.File(tmp_path / "masks.h5", "r") as file:
        assert np.array_equal(file["m"][()], packed)


def test_a_wrong_checksum_is_caught_by_hdf5(tmp_path):
    packed = np.packbits(np.random.default_rng(0).random(80_000) > 0.5)
    encoded = encode_mask(packed)
    damaged = bytearray(encoded.chunks[0])
    damaged[-1] ^= 0xFF
    with h5py.File(tmp_path / "masks.h5", "w") as file:
        dataset = file.create_dataset("m", shape=(encoded.nbytes,), dtype=np.uint8, chunks=(encoded.chunk_bytes,),
                                      compression="gzip", fletcher32=True)
        dataset.id.write_direct_chunk((0,), bytes(damaged))
    with h5py.File(tmp_path / "masks.h5", "r") as file, pytest.raises(OSError):
        file["m"][()]
