"""The archive of a block-sequential run: created or reopened, each block recorded, decisions read back.

    hpcprune prune --config configs/llm_wanda.yaml --resume     # continues at the first unrecorded block

Rank 0 creates the archive (config, the model's parameter table from the skeleton, round 1 begun)
or reopens it to resume, holds it until the run ends (`hpcprune.run.resume.holding_archive`), and
tells every rank which blocks are recorded and where the run's states folder is (`SequentialPoint`);
a refusal (the archive in use, a different config, a damaged archive) is raised on every rank. After
each block it writes the block's updated weights, if the method changed any, to
`<states folder>/blocks/block-<NNNN>.safetensors` (written whole or not at all), then the block's
masks and rows (hpcprune.archive.blocks). On resume, a recorded block's decisions come back from the
archive (rank 0 reads the masks and broadcasts them) and from its shard (every rank reads it).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from hpcprune.archive.atomic import check_output_path, replace_atomically
from hpcprune.archive.blocks import BlockRecords, read_block_masks, recorded_blocks
from hpcprune.archive.reader import open_archive
from hpcprune.archive.wire import MaskMessage
from hpcprune.archive.writer import Archive, state_path
from hpcprune.config import RunConfig
from hpcprune.dist.failures import agreed
from hpcprune.dist.world import World
from hpcprune.models.lazy import LazyModel
from hpcprune.prune.plan import Plan
from hpcprune.prune.sequential.decisions import BlockDecisions
from hpcprune.prune.sequential.layers import BlockLayer

log = logging.getLogger("hpcprune")

ROUND = 1  # the whole block-sequential pass is one round


@dataclass
class SequentialPoint:
    """What every rank learns from rank 0 before the blocks run."""

    recorded: list[dict] = field(default_factory=list)  # rows of /rounds/0001/blocks
    complete: dict | None = None  # the round's attrs when the run had already finished
    states: str = ""  # the run's states folder (hpcprune.archive.side_files): shards, spilled activations


def open_sequential_archive(config: RunConfig, world: World, lazy: LazyModel, plan: Plan, *,
                            resume: bool, force: bool) -> SequentialPoint:
    """Rank 0 creates or reopens the archive and holds it; every rank learns the point, or the refusal."""
    point = agreed(world, lambda: _open_on_root(config, world, lazy, plan, resume=resume, force=force)
                   if world.is_root else None)
    shared = world.broadcast_bytes(json.dumps(asdict(point)).encode() if world.is_root else None)
    return SequentialPoint(**json.loads(shared))


def _open_on_root(config: RunConfig, world: World, lazy: LazyModel, plan: Plan, *, resume: bool,
                  force: bool) -> SequentialPoint:
    path = Path(config.output.path)
    check_output_path(path, state_path(path, "dense"))
    where = f"{world.size} rank(s), {world.name} world"
    if resume and path.exists():
        archive = BlockRecords.open_resume(path, config_yaml=config.to_yaml(), world_size=world.size)
        complete = [attrs for attrs in open_archive(path).rounds() if attrs["index"] == ROUND]
        point = SequentialPoint(recorded_blocks(path, ROUND), complete[0] if complete else None)
        log.info("resuming %s after %d of %d blocks", path, len(point.recorded), len(lazy))
        archive.record_event("resume", f"after {len(point.recorded)} of {len(lazy)} blocks on {where}")
    else:
        archive = BlockRecords.create(path, config_yaml=config.to_yaml(), model_name=config.model.name,
                                      params=_param_table(lazy, plan), world_size=world.size, backend=world.name,
                                      force=force)
        archive.record_event("start", where)
        point = SequentialPoint()
    if point.complete is None:
        archive.begin(ROUND, _initial_attrs(config, plan))
    point.states = str(archive.side.states.absolute())
    return point


def _param_table(lazy: LazyModel, plan: Plan) -> list[tuple[str, tuple[int, ...], bool]]:
    prunable = {spec.name for spec in plan.tensors}
    return [(name, tuple(parameter.shape), name in prunable) for name, parameter in lazy.model.named_parameters()]


def _initial_attrs(config: RunConfig, plan: Plan) -> dict:
    return dict(criterion=config.prune.criterion, rule=config.prune.rule, target_sparsity=config.prune.sparsity,
                achieved_sparsity=math.nan, kept=0, total=plan.total, threshold=None,
                propagate=config.sequential.propagate, eval_metric="", eval_dense=math.nan, eval_pruned=math.nan)


def record_block(config: RunConfig, index: int, layers: list[BlockLayer], decisions: BlockDecisions,
                 errors: dict[str, float], seconds: float) -> None:
    """Rank 0: the block's shard (if weights changed), then its masks and rows in one archive update."""
    archive = _held(config)
    weights_file = ""
    if decisions.weights:
        shard = block_shard(archive.side.states, index)
        with replace_atomically(shard) as temporary:
            save_file(decisions.weights, str(temporary))
        weights_file = str(shard.absolute())
    masks = {}
    for layer in layers:
        encoded, kept = decisions.encoded(layer.spec.name)
        masks[layer.spec.name] = (encoded, layer.spec.shape, kept)
    archive.record_block(ROUND, index, seconds=seconds, weights_file=weights_file, masks=masks,
                         errors={layer.spec.name: errors[layer.spec.name] for layer in layers})


def block_shard(states: Path, index: int) -> Path:
    """Where block `index`'s updated weights go, in the run's states folder."""
    return states / "blocks" / f"block-{index:04d}.safetensors"


def _held(config: RunConfig) -> BlockRecords:
    """Rank 0's archive of this run, held since `open_sequential_archive`."""
    archive = Archive.held(config.output.path)
    if not isinstance(archive, BlockRecords):
        raise RuntimeError(f"{config.output.path} is not held as a block-sequential archive by this process")
    return archive


def finish_round(config: RunConfig, attrs: dict, detail: str) -> None:
    """Rank 0: the round complete with its final attrs, and the run's "finish" event."""
    archive = _held(config)
    archive.finish(ROUND, attrs)
    archive.record_event("finish", detail)


def recorded_decisions(config: RunConfig, world: World, layers: list[BlockLayer], row: dict) -> BlockDecisions:
    """A recorded block's decisions on every rank: masks from the archive (via rank 0), weights from its shard."""
    names = [layer.spec.name for layer in layers]
    message = MaskMessage.of_packed(read_block_masks(config.output.path, ROUND, names)) if world.is_root else None
    if world.size > 1:
        message = MaskMessage.from_bytes(world.broadcast_bytes(message.to_bytes() if world.is_root else None))
    weights = load_file(row["weights_file"]) if row["weights_file"] else {}
    return BlockDecisions(message, weights)
