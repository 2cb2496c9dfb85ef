"""Floor 2, archive: the run's HDF5 archive, the files that belong to it, and every file that must appear whole.

What lives here: the layout (`layout`) and its writer (`writer`, rank 0 only, with `round_recording`; the block-sequential round recorded block by block, `blocks`)
and reader (`reader`, which checks the archive against its own plan with `structure`), updates made
on a copy (`update`), the masks in immutable part files beside the archive (`mask_parts`), the names
of the archive's side files (`side_files`), the one-writer lock (`lock`), what killed writers leave
(`leftovers`), configs compared for resume (`config_diff`), the mask codec (`codec`: packed bits,
chunks compressed exactly as HDF5's filters store them), the one message format for masks between
processes (`wire`), and the one atomic-write helper every output file goes through, with the check
that no command writes over its own inputs (`atomic`). It may import `hpcprune.errors` and
`hpcprune.config`, nothing above: no World, no model, no torch.nn. It sits this low because the
floors above it (signals, training checkpoints, model states, fan-out files) record into it.
"""
