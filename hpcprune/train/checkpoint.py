"""The mid-fine-tuning checkpoint: an interrupted training continues at the epoch where it stopped.

    scancel --signal=USR1 <job id>     # during fine-tuning: the run stops after the current epoch

After every epoch but the last (a safe point, see `hpcprune.dist.signals`) the ranks agree whether any
of them was signalled. If so, rank 0 writes beside the archive, in `<stem>.states/`:

    training-<stage>-e<epoch>.safetensors   the model's tensors
    training-<stage>-e<epoch>.pt            optimizer and LR-schedule state dicts, the epoch records so
                                            far and the RNG states (torch.save; read with weights_only=True)

and points /checkpoint at them (attrs training_stage, training_epoch, training_model_file,
training_state_file; paths relative to the archive's folder). Stage 0 is the dense training, stage
r the fine-tuning of round r. Resume selects stage r's masks again (selection is deterministic),
then `restore` loads these states, so the remaining epochs are those an uninterrupted run trains.
A saved stage is used only by the stage that follows the last complete one; each new save removes
the training files of the previous one.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hpcprune.archive.atomic import replace_atomically
from hpcprune.archive.writer import Archive, state_path
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

    def __init__(self, world: World, archive: Path, stage: int, label: str, saved: SavedTraining | None,
                 *, saves: bool = True):
        self.world, self.archive, self.stage, self.label = world, Path(archive), stage, label
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
        torch.set_rng_state(extra["rng"]["torch"])
        if extra["rng"].get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
        log.info("%s: continuing after epoch %d of %d", self.label, state.epoch, state.epochs)

    def after_epoch(self, state: TrainingState) -> None:
        record = state.records[-1]
        log.info("%s: epoch %d/%d done (train loss %.4f, eval accuracy %.2f %%)", self.label, state.epoch,
                 state.epochs, record.train_loss, 100 * record.eval_accuracy)
        if state.epoch < state.epochs:  # after the last epoch the stage is recorded whole instead
            stop_here(self.world, self.archive, f"in {self.label} after epoch {state.epoch} of {state.epochs}",
                      save=(lambda: self.save(state)) if self.saves else None)

    def save(self, state: TrainingState) -> None:
        """Rank 0: write the state files, then point /checkpoint at them (the files first: a crash
        in between leaves the previous checkpoint valid)."""
        label = f"training-{self.stage:04d}-e{state.epoch:04d}"
        model_file = state_path(self.archive, label)
        save_checkpoint(unwrap(state.model), model_file)
        state_file = model_file.with_suffix(".pt")
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        _save_atomically({"optimizer": state.optimizer.state_dict(), "lr_schedule": state.schedule.state_dict(),
                          "records": [asdict(record) for record in state.records], "rng": rng}, state_file)
        Archive.at(self.archive).mark_training(self.stage, state.epoch, model_file, state_file)
        for older in model_file.parent.glob("training-*"):  # earlier interruptions' states are stale now
            if older not in (model_file, state_file):
                older.unlink(missing_ok=True)
        log.info("%s: saved after epoch %d in %s", self.label, state.epoch, model_file.parent)


def _save_atomically(value: Any, path: Path) -> None:
    with replace_atomically(path) as temporary:
        torch.save(value, temporary)
