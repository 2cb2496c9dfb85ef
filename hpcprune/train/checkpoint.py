"""The mid-fine-tuning checkpoint: an interrupted training continues at the epoch where it stopped.

    scancel --signal=USR1 <job id>     # during fine-tuning: the run stops after the current epoch

After every epoch but the last (a safe point, see `hpcprune.dist.signals`) the ranks agree whether any
of them was signalled. If so, rank 0 writes into the run's states folder (`run.h5.states/`, see
`hpcprune.archive.side_files`):

    training-<stage>-e<epoch>.safetensors   the model's tensors
    training-<stage>-e<epoch>.pt            optimizer and LR-schedule state dicts, the epoch records so
                                            far and the RNG states (torch.save; read with weights_only=True)

and points /checkpoint at them (attrs training_stage, training_epoch, training_model_file,
training_state_file; paths relative to the archive's folder). The RNG states are every rank's own:
the CPU generator and the generator of the rank's own GPU, gathered on rank 0 after each epoch (a
few bytes) and restored on each rank from its own entry. Stage 0 is the dense training, stage
r the fine-tuning of round r. Resume selects stage r's masks again (selection is deterministic),
then `restore` loads these states, so the remaining epochs are those an uninterrupted run trains.
A saved stage is used only by the stage that follows the last complete one; each new save removes
the training files of the previous one.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hpcprune.archive.atomic import replace_atomically
from hpcprune.archive.side_files import SideFiles
from hpcprune.archive.writer import Archive
from hpcprune.dist.signals import stop_here
from hpcprune.dist.world import World
from hpcprune.models.builders import load_checkpoint, save_checkpoint
from hpcprune.prune.masks import unwrap
from hpcprune.train.finetune import EpochRecord, TrainingState

log = logging.getLogger("hpcprune")


@dataclass(frozen=True)
class SavedTraining:
    """Where /checkpoint says an interrupted training stage was saved (paths archive-relative)."""

    stage: int
    epoch: int
    model_file: str
    state_file: str

    @classmethod
    def from_checkpoint(cls, attrs: dict[str, Any] | None) -> SavedTraining | None:
        if not attrs or "training_stage" not in attrs:
            return None
        return cls(int(attrs["training_stage"]), int(attrs["training_epoch"]),
                   str(attrs["training_model_file"]), str(attrs["training_state_file"]))


class EpochCheckpoint:
    """The `finetune.Resumable` of one training stage of the run recorded in `archive`."""

    def __init__(self, world: World, archive: Path, side: SideFiles, stage: int, label: str,
                 saved: SavedTraining | None, *, saves: bool = True):
        self.world, self.archive, self.side, self.stage, self.label = world, Path(archive), side, stage, label
        self.saved = saved if saved is not None and saved.stage == stage else None
        # A gradual round's masks move with the steps: its model, optimizer and RNG alone would not
        # resume it to the same masks, so such a stage stops without saving and is redone whole.
        self.saves = saves

    def restore(self, state: TrainingState) -> None:
        if self.saved is None:
            return
        load_checkpoint(unwrap(state.model), self.archive.parent / self.saved.model_file)
        extra = torch.load(self.archive.parent / self.saved.state_file, map_location="cpu", weights_only=True)
        state.optimizer.load_state_dict(extra["optimizer"])
        state.schedule.load_state_dict(extra["lr_schedule"])
        state.records[:] = [EpochRecord(**record) for record in extra["records"]]
        restore_rng(extra["rng"], self.world.rank)
        log.info("%s: continuing after epoch %d of %d", self.label, state.epoch, state.epochs)

    def after_epoch(self, state: TrainingState) -> None:
        record = state.records[-1]
        log.info("%s: epoch %d/%d done (train loss %.4f, eval accuracy %.2f %%)", self.label, state.epoch,
                 state.epochs, record.train_loss, 100 * record.eval_accuracy)
        if state.epoch < state.epochs:  # after the last epoch the stage is recorded whole instead
            rng = rng_of_every_rank(self.world) if self.saves else None  # collective: before the stop is agreed
            stop_here(self.world, self.archive, f"in {self.label} after epoch {state.epoch} of {state.epochs}",
                      save=(lambda: self.save(state, rng)) if self.saves else None)

    def save(self, state: TrainingState, rng: list[dict[str, torch.Tensor]]) -> None:
        """Rank 0: write the state files, then point /checkpoint at them (the files first: a crash
        in between leaves the previous checkpoint valid)."""
        label = f"training-{self.stage:04d}-e{state.epoch:04d}"
        model_file = self.side.state(label)
        save_checkpoint(unwrap(state.model), model_file)
        state_file = model_file.with_suffix(".pt")
        _save_atomically({"optimizer": state.optimizer.state_dict(), "lr_schedule": state.schedule.state_dict(),
                          "records": [asdict(record) for record in state.records], "rng": {"ranks": rng}},
                         state_file)
        Archive.at(self.archive).mark_training(self.stage, state.epoch, model_file, state_file)
        for older in model_file.parent.glob("training-*"):  # earlier interruptions' states are stale now
            if older not in (model_file, state_file):
                older.unlink(missing_ok=True)
        log.info("%s: saved after epoch %d in %s", self.label, state.epoch, model_file.parent)


def rng_of_every_rank(world: World) -> list[dict[str, torch.Tensor]] | None:
    """Each rank's generators, in rank order on rank 0 (None elsewhere): the CPU's, and its own GPU's
    when the run uses one (the current device, which the pipeline set to the rank's GPU)."""
    mine = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state()
    buffer = io.BytesIO()
    torch.save(mine, buffer)
    gathered = world.gather_bytes(buffer.getvalue())
    return None if gathered is None else [torch.load(io.BytesIO(data), weights_only=True) for data in gathered]


def restore_rng(saved: dict[str, Any], rank: int) -> None:
    """This rank's own generators from a training state file: its entry of "ranks" (files written
    before held rank 0's CPU state and every GPU's state, by device index)."""
    if "ranks" in saved:
        own = saved["ranks"][rank]
        torch.set_rng_state(own["torch"])
        if "cuda" in own and torch.cuda.is_available():
            torch.cuda.set_rng_state(own["cuda"])  # the current device: this rank's own
        return
    torch.set_rng_state(saved["torch"])
    every_gpu = saved.get("cuda") or []
    if every_gpu and torch.cuda.is_available() and torch.cuda.current_device() < len(every_gpu):
        torch.cuda.set_rng_state(every_gpu[torch.cuda.current_device()])


def _save_atomically(value: Any, path: Path) -> None:
    with replace_atomically(path) as temporary:
        torch.save(value, temporary)
