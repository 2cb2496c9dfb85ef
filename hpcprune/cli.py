"""The command line: `hpcprune prune`, `submit`, `inspect`, `report` and `export`.

    hpcprune prune --config configs/quickstart.yaml [--set prune.sparsity=0.8] [--out run.h5] [--resume|--force]
    hpcprune submit --config configs/quickstart.yaml --tasks-per-node 4 [--wait]
    hpcprune inspect [summary|layers|diff|plot|masks] run.h5 ...
    hpcprune report run.h5 --out report.html
    hpcprune export run.h5 --format sparse --out model.safetensors

Settings live in the config tree, not in flags: the CLI only names the config, its overrides and
what to do with an existing archive. Errors in what the user gave print one line and exit 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from collections.abc import Iterator

import click

from hpcprune import __version__
from hpcprune.dist.detect import launcher_rank
from hpcprune.dist.failures import AgreedFailure, exit_code_of
from hpcprune.dist.logs import setup_logging
from hpcprune.dist.world import CollectiveTimeout, World, is_peer_loss
from hpcprune.errors import UsageError

PEER_LOSS_GRACE_SECONDS = 3.0
"""How long a rank that lost a peer waits before it aborts, so the launcher names the dead rank first."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hpcprune")
def cli() -> None:
    """Prune PyTorch models at cluster scale and keep everything in one HDF5 archive."""


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config (default: all defaults).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. prune.sparsity=0.8 (repeatable).")
@click.option("--out", help="Archive to write (overrides output.path).")
@click.option("--resume", is_flag=True, help="Continue the run recorded in the archive from its last complete round.")
@click.option("--force", is_flag=True, help="Overwrite an existing archive.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and the final summary.")
def prune(config_path: str | None, overrides: tuple[str, ...], out: str | None, resume: bool, force: bool, quiet: bool) -> None:
    """Score, select, mask and fine-tune, recording every round in the archive.

    \b
    Examples:
      hpcprune prune --config configs/quickstart.yaml
      hpcprune prune --config configs/quickstart.yaml --set prune.sparsity=0.95 --out runs/s95.h5
      mpirun -n 4 hpcprune prune --config configs/oneshot_global.yaml

    SIGUSR1 or SIGTERM stops the run at its next safe point, requeues a SLURM job and exits 75;
    SIGINT (Ctrl-C) stops it there too, without a requeue, and exits 130 (twice: at once).
    """
    from hpcprune.archive.atomic import refuse_own_input
    from hpcprune.config import load_config

    if resume and force:
        raise UsageError("--resume and --force contradict each other: pick one")
    all_overrides = [*overrides, *_out_override(out)]
    config = load_config(config_path, all_overrides)
    refuse_own_input(config.output.path, files=[path for path in (config_path, config.model.checkpoint) if path],
                     option="output.path")
    # Only now torch and the pipeline (seconds to import): a config refused above is refused at once.
    from hpcprune.dist import signals
    from hpcprune.dist.detect import detect_world
    from hpcprune.run.pipeline import run

    signals.listen()  # before anything is written: from here on a signal can no longer kill the run mid-write
    world = detect_world()
    setup_logging(world.rank, quiet)
    with ends_every_rank_on_failure(world), signals.exits_when_preempted(world):
        result = run(config, world, resume=resume, force=force)
    world.close()
    if world.is_root:
        click.echo(_final_summary(result))


def _out_override(out: str | None) -> list[str]:
    """`--out PATH` as the override output.path=PATH; quoted, so that YAML reads any path as the string given."""
    return [] if out is None else [f"output.path={json.dumps(out)}"]


def _final_summary(result) -> str:
    lines = [f"archive {result.archive}"]
    if result.eval_metric is not None:  # schedule sequential: the held-out text, dense and pruned
        lines += _text_figures(result)
    elif result.model is not None:  # masks-only runs (model.name: checkpoint) have nothing to evaluate
        lines += [f"dense test accuracy  {100 * result.dense_accuracy:.2f} %",
                  f"pruned test accuracy {100 * result.final_accuracy:.2f} % "
                  f"({100 * (result.final_accuracy - result.dense_accuracy):+.2f} pp)"]
    if result.target_unit == "weights":
        lines.append(f"sparsity             {100 * result.achieved_sparsity:.4f} % achieved, {100 * result.target_sparsity:.4f} % asked "
                     f"({result.kept} of {result.total} prunable weights kept)")
    else:  # the target counts channels; the weights they take with them are what the model loses
        lines.append(f"sparsity             {100 * result.target_sparsity:.4f} % of {result.target_unit} asked, "
                     f"{100 * result.achieved_sparsity:.4f} % of weights achieved "
                     f"({result.kept} of {result.total} prunable weights kept)")
    return "\n".join(lines)


def _text_figures(result) -> list[str]:
    import math

    if math.isnan(result.eval_dense):
        return [f"{result.eval_metric:<20} not measured (no eval.text)"]
    if result.eval_metric == "perplexity":
        return [f"dense perplexity     {result.eval_dense:.4f}",
                f"pruned perplexity    {result.eval_pruned:.4f} (x{result.eval_pruned / result.eval_dense:.3f})"]
    return [f"pruned cosine        {result.eval_pruned:.6f} to the dense model's embeddings"]


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config (default: all defaults).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--out", help="Archive to write (overrides output.path).")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--tasks-per-node", type=click.IntRange(min=1), default=1, show_default=True, help="Ranks per node.")
@click.option("--gpus-per-task", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--time", "time_min", type=click.IntRange(min=1), default=60, show_default=True, help="Time limit in minutes.")
@click.option("--partition", help="SLURM partition (default: the cluster's default).")
@click.option("--cluster", type=click.Choice(["slurm", "local"]), help="Default: slurm when sbatch is on PATH, else local processes.")
@click.option("--wait", is_flag=True, help="Wait for the job and print the run's summary.")
@click.option("--resume", is_flag=True, help="Continue the run recorded in the archive.")
@click.option("--force", is_flag=True, help="Overwrite an existing archive.")
def submit(config_path: str | None, overrides: tuple[str, ...], out: str | None, nodes: int, tasks_per_node: int,
           gpus_per_task: int, time_min: int, partition: str | None, cluster: str | None, wait: bool, resume: bool,
           force: bool) -> None:
    """Submit the run as a batch job through submitit; it is requeued and resumes when preempted.

    \b
    Examples:
      hpcprune submit --config configs/quickstart.yaml --tasks-per-node 4 --time 120
      hpcprune submit --config configs/oneshot_global.yaml --nodes 2 --partition gpu --gpus-per-task 1 --wait
    """
    import math
    from pathlib import Path

    from hpcprune.config import load_config

    if resume and force:
        raise UsageError("--resume and --force contradict each other: pick one")
    config = load_config(config_path, [*overrides, *_out_override(out)])
    from hpcprune.run.submit import SubmitOptions  # after the config: a bad one is refused without importing torch
    from hpcprune.run.submit import submit as submit_job

    options = SubmitOptions(nodes, tasks_per_node, gpus_per_task, time_min, partition, cluster)
    job = submit_job(config, options, resume=resume, force=force)
    click.echo(f"job {job.job_id} submitted\narchive {Path(config.output.path).absolute()}\n"
               f"logs {job.paths.stdout} (and .err)")
    if wait:
        try:
            result = job.results()[0]  # rank 0's; the other tasks return None
        except Exception as error:  # submitit re-raises the job's failure here
            raise click.ClickException(f"job {job.job_id} did not complete (log: {job.paths.stderr}):\n{error}") from None
        click.echo(_final_summary(result))
        if math.isfinite(result.final_accuracy):
            click.echo(f"pruned test accuracy {100 * result.final_accuracy:.2f} %")


class _SummaryByDefault(click.Group):
    """`hpcprune inspect run.h5 [--json]` means `hpcprune inspect summary run.h5 [--json]`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["summary", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_SummaryByDefault)
def inspect() -> None:
    """Read an archive: summary (the default), layers, diff, plot, masks.

    \b
    Examples:
      hpcprune inspect runs/quickstart.h5 [--json]
      hpcprune inspect layers runs/quickstart.h5 --round 2
      hpcprune inspect diff runs/a.h5 runs/b.h5
      hpcprune inspect plot runs/quickstart.h5 --out plots/
      hpcprune inspect masks runs/quickstart.h5 --out masks.safetensors
    """


ARCHIVE = click.argument("archive", type=click.Path(dir_okay=False))
AS_JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
ROUND = click.option("--round", "round_index", type=int, help="Round to read (default: the last complete one).")
FORCE = click.option("--force", is_flag=True, help="Overwrite existing output files.")


def _show(facts: dict, render, as_json: bool) -> None:
    import json

    click.echo(json.dumps(facts, indent=2, allow_nan=False) if as_json else render(facts))


@inspect.command("summary")
@ARCHIVE
@AS_JSON
def inspect_summary(archive: str, as_json: bool) -> None:
    """Provenance, rounds (sparsity, threshold, accuracy, stage times) and the last round's layers."""
    from hpcprune.read.summary import render_summary, summary

    _show(summary(archive), render_summary, as_json)


@inspect.command("layers")
@ARCHIVE
@ROUND
@AS_JSON
def inspect_layers(archive: str, round_index: int | None, as_json: bool) -> None:
    """One round's per-tensor table with score statistics (recomputed from the recorded weights)."""
    from hpcprune.read.summary import layers, render_layers

    _show(layers(archive, round_index), render_layers, as_json)


@inspect.command("diff")
@click.argument("first", type=click.Path(dir_okay=False))
@click.argument("second", type=click.Path(dir_okay=False))
@ROUND
@AS_JSON
def inspect_diff(first: str, second: str, round_index: int | None, as_json: bool) -> None:
    """Per-tensor agreement of two runs' masks (identical bits, Jaccard) and their metrics side by side."""
    from hpcprune.read.diff import diff, render_diff

    _show(diff(first, second, round_index), render_diff, as_json)


@inspect.command("plot")
@ARCHIVE
@click.option("--out", help="Folder for the PNG files (default: <archive>-plots beside the archive).")
@FORCE
def inspect_plot(archive: str, out: str | None, force: bool) -> None:
    """PNG figures: per-layer sparsity, accuracy/loss against sparsity, fine-tuning, score histograms."""
    from pathlib import Path

    from hpcprune.read.plots import write_plots

    written = write_plots(archive, out or Path(archive).with_name(f"{Path(archive).name}-plots"), force=force)
    click.echo("\n".join([*(f"wrote {file}" for file in written["files"]),
                          *(f"left out {name}: {reason}" for name, reason in written["skipped"].items())]))


@inspect.command("masks")
@ARCHIVE
@ROUND
@click.option("--out", required=True, help="safetensors file to write (bool tensors, True = kept).")
@FORCE
def inspect_masks(archive: str, round_index: int | None, out: str, force: bool) -> None:
    """One round's masks as a safetensors file of bool tensors, for use without hpcprune."""
    from hpcprune.read.masks_file import export_masks

    written = export_masks(archive, out, round_index, force=force)
    click.echo(f"wrote {written['out']}: round {written['round']}, {written['tensors']} masks, {written['bytes']} bytes")


@cli.command()
@ARCHIVE
@click.option("--out", help="HTML file to write (default: <archive>.html beside the archive).")
@FORCE
def report(archive: str, out: str | None, force: bool) -> None:
    """One self-contained HTML page with the summary and the figures (opens in any browser)."""
    from pathlib import Path

    from hpcprune.read.report import write_report

    written = write_report(archive, out or Path(archive).with_name(f"{Path(archive).name}.html"), force=force)
    click.echo("\n".join([f"wrote {written['out']}",
                          *(f"left out {name}: {reason}" for name, reason in written["skipped"].items())]))


@cli.command()
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--round", "round_index", type=int, help="Round to export (default: the last complete one).")
@click.option("--format", "fmt", required=True, metavar="masked|compact|sparse|int8|hf", help="What to write (see README).")
@click.option("--out", required=True, help="File to write (safetensors); a folder for --format hf.")
@click.option("--int8-base", default="masked", metavar="masked|compact", help="Model that --format int8 quantizes.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
def export(archive: str, round_index: int | None, fmt: str, out: str, int8_base: str, force: bool) -> None:
    """Write one round as a deployable model and record its size, FLOPs and accuracy in the archive."""
    from hpcprune.deploy.export import export as export_round

    click.echo(export_round(archive, fmt=fmt, out=out, round_index=round_index, force=force, int8_base=int8_base).render())


@contextlib.contextmanager
def ends_every_rank_on_failure(world: World) -> Iterator[None]:
    """A failure on one rank must not leave the others waiting in a collective.

    A failure every rank learned of at the same collective (hpcprune.dist.failures) is reported once,
    by the first rank that failed, and every rank leaves with its status. Any other failure is
    reported here, with the rank, and ends the whole job (MPI_Abort or equivalent); a rank that only
    lost a peer says so and leaves the story of the failure to that peer or to the launcher.
    """
    try:
        yield
    except AgreedFailure as failure:
        if failure.reports:
            _report(world, failure.cause)
        _leave_together(world, failure.exit_code)
    except Exception as error:
        if world.size == 1:
            raise
        # Late: torch is loaded by now. DDP's own collectives reach gloo directly, unexplained.
        from hpcprune.dist.torch_dist import collective_failure

        error = collective_failure(error)
        if isinstance(error, CollectiveTimeout):
            click.echo(f"[rank {world.rank}] stopping: {error}", err=True)
            world.abort(1)
        if not is_peer_loss(error):
            _report(world, error)
            world.abort(exit_code_of(error))
        # Another rank failed or died: it, or the launcher that saw it die, says which and why.
        # This rank only says that it stops, and gives the launcher a moment to report the dead
        # rank before an abort in this rank's name would come first.
        click.echo(f"[rank {world.rank}] stopping: {str(error).splitlines()[0][:300]}", err=True)
        time.sleep(PEER_LOSS_GRACE_SECONDS)
        world.abort(1)


def _report(world: World, error: BaseException) -> None:
    """One line for a user error, the traceback for anything else; the rank named where it matters."""
    if isinstance(error, UsageError):
        where = f"[rank {world.rank}] " if world.rank else ""
        click.echo(f"hpcprune: error: {where}{error}", err=True)
    else:
        click.echo(f"[rank {world.rank}] failed:\n{''.join(traceback.format_exception(error)).rstrip()}", err=True)


def _leave_together(world: World, exit_code: int) -> None:
    """Every rank is at the same point: wait until the report is out (a launcher may end the job as
    soon as one rank exits non-zero), then every rank exits with the failing rank's status."""
    try:
        world.barrier()
        world.close()
    except Exception:  # noqa: BLE001  (a rank died meanwhile: end the job the hard way)
        world.abort(exit_code)
    raise SystemExit(exit_code)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except UsageError as error:
        _refuse(str(error), error.exit_code)
    except click.UsageError as error:  # click's own checks of the flags: the same one line as ours
        _refuse(" ".join(error.format_message().split()), UsageError.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)


def _refuse(message: str, exit_code: int) -> None:
    # Errors found before the ranks know each other (config, flags) are the same on every rank:
    # only the launcher's rank 0 prints them.
    if launcher_rank() == 0:
        click.echo(f"hpcprune: error: {message}", err=True)
    sys.exit(exit_code)
