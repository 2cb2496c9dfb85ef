"""Export: turn one round of an archive into a file a user deploys, and measure what it saves.

    hpcprune export runs/quickstart.h5 --format sparse --out runs/quickstart.sparse.safetensors
    hpcprune export runs/structured.h5 --round 2 --format compact --out model.safetensors

The round's model is rebuilt from the archive: the architecture from /config (the model registry),
the weights from the round's state file, the masks from the round. Every format is one safetensors
file whose metadata (`hpcprune.export`, JSON) says how to rebuild the model, so `load_exported`
needs nothing pickled:

    masked   the state dict with pruned weights 0.0
    compact  silent channels and neurons cut out: a smaller dense model (`hpcprune.deploy.compact`)
    sparse   masked tensors as bitmask + kept values or CSR (`hpcprune.deploy.sparse`)
    int8     dynamic int8 quantization of the masked or compacted model (`hpcprune.deploy.quantize`)

and one format is a folder: `hf` (`hpcprune export run.h5 --format hf --out DIR`) writes the run's
Hugging Face folder with its weights pruned, as sharded safetensors that the model's own
transformers class loads (`hpcprune.deploy.hf_folder`), tensor by tensor.

After writing, the file is loaded back and measured: parameters (stored and nonzero), bytes on disk,
FLOPs per sample, and test accuracy when the run's data is available (a Hugging Face model has
neither: it is measured by its parameters and bytes). The figures are printed and
appended to the archive as /exports/<NNNN>. An archive of `model.name: checkpoint` has no module:
it exports masked and sparse only.

A refused export leaves nothing behind: what can be refused is checked before any work (the output
path, that it is none of the archive's own files, that the archive can be locked, and so recorded
into, in its folder), and the file is measured and recorded under its temporary name, which becomes
`--out` only once the archive holds its figures. While an export records into an archive it holds
the archive's lock (`hpcprune.archive.lock`): an export of an archive that a run is writing is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from hpcprune.archive.atomic import (
    check_output_path,
    refuse_own_input,
    replace_atomically,
)
from hpcprune.archive.reader import open_archive, refuse_writing_over
from hpcprune.archive.writer import Archive
from hpcprune.config import CHECKPOINT_MODEL
from hpcprune.deploy.formats import (
    EXPORTERS,
    FOLDER_FORMAT,
    INT8_BASES,
    METADATA_KEY,
    Artefact,
    exported_model,
    exporter,
    load_exported,
)
from hpcprune.deploy.hf_folder import export_folder
from hpcprune.deploy.measure import ExportReport, count_flops, measure
from hpcprune.deploy.round_model import RoundModel, build_architecture, load_round
from hpcprune.errors import UsageError

# The public face of exports: `model.name: hpcprune.deploy.export:exported_model` builds a model
# from one, and scripts read one back with load_exported.
__all__ = ["build_architecture", "count_flops", "export", "exported_model", "load_exported", "load_round"]


def export(archive: str | Path, *, fmt: str, out: str | Path, round_index: int | None = None,
           force: bool = False, int8_base: str = "masked", record: bool = True) -> ExportReport:
    """Write round `round_index` (default: the last complete one) of `archive` as `fmt` to `out`."""
    if fmt != FOLDER_FORMAT:
        exporter(fmt)
        if int8_base not in INT8_BASES:
            raise UsageError(f"--int8-base {int8_base!r}: expected one of {', '.join(INT8_BASES)}")
    refuse_writing_over(open_archive(archive), out)
    held_before = Archive.held(archive) is not None
    recorder = Archive.at(archive) if record else None  # refuses a live writer, or a folder it cannot record in
    try:
        if fmt != FOLDER_FORMAT:
            return _export_file(archive, fmt, Path(out), round_index, force, int8_base, recorder)
        report = export_folder(archive, Path(out), round_index, force)
        if recorder is not None:
            recorder.write_export(_export_attrs(report, Path(out)))
        return report
    finally:
        if recorder is not None and not held_before:
            recorder.close()


def _export_file(archive: str | Path, fmt: str, out: Path, round_index: int | None, force: bool, int8_base: str,
                 recorder: Archive | None) -> ExportReport:
    """One safetensors file, measured and recorded under its temporary name, then renamed to `out`."""
    chosen = exporter(fmt)
    out = _check_out(out, force)
    job = load_round(archive, round_index)
    if chosen.needs_module and job.model is None:
        raise UsageError(f"--format {fmt}: {job.archive} was run on model.name '{CHECKPOINT_MODEL}' (no module); "
                         f"it exports as: {', '.join(name for name, e in EXPORTERS.items() if not e.needs_module)}")
    refuse_own_input(out, files=[job.config.model.checkpoint] if job.config.model.checkpoint else [])
    artefact = chosen.build(job, int8_base)
    with replace_atomically(out) as temporary:
        _write(temporary, artefact, _metadata(job, fmt, artefact))
        report = measure(job, fmt, temporary, artefact.details)
        report.path = str(out)
        if recorder is not None:  # before the rename: a failed record leaves no export behind
            recorder.write_export(_export_attrs(report, out))
    return report


def _check_out(out: Path, force: bool) -> Path:
    """Refuse an output that would overwrite without --force or cannot be written, before any work."""
    check_output_path(out)
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; name the file to write")
    if out.exists() and not force:
        raise UsageError(f"--out {out}: exists; pass --force to overwrite it")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UsageError(f"--out {out}: cannot write there ({folder} is not a writable folder)")
    return out


def _metadata(job: RoundModel, fmt: str, artefact: Artefact) -> dict[str, str]:
    description = {"format": fmt, "archive": str(job.archive), "round": job.round,
                   "architecture": job.architecture, "details": artefact.details}
    return {"format": "pt", METADATA_KEY: json.dumps(description), **artefact.extra_metadata}


def _write(file: Path, artefact: Artefact, metadata: dict[str, str]) -> None:
    save_file({name: tensor.contiguous() for name, tensor in artefact.tensors.items()}, str(file), metadata=metadata)


def _export_attrs(report: ExportReport, out: Path) -> dict[str, Any]:
    attrs = asdict(report)
    attrs["details"] = json.dumps(attrs["details"])
    attrs["path"] = str(out.absolute())  # the archive stores it relative to its own folder
    return attrs
