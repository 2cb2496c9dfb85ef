"""Floor 2, archive: the run's HDF5 archive and every file that must appear whole.

What lives here: the layout and its writer (`writer`, rank 0 only) and reader (`reader`), updates
made on a copy (`update`), the block-sequential round recorded block by block (`blocks`), the mask
codec (`codec`: packed bits, chunks compressed exactly as HDF5's filters store them), the one message format for masks between processes (`wire`), and the one
atomic-write helper every output file goes through (`atomic`). It may import `hpcprune.errors`
and `hpcprune.config`, nothing above: no World, no model, no torch.nn. It sits this low because
the floors above it (signals, training checkpoints, model states, fan-out files) record into it.
"""
