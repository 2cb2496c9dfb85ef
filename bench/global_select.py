"""Benchmark of exact global magnitude selection: hpcprune against two plain-torch ways.

    python bench/global_select.py                      # 24 x Linear(2048, 2048), ~100.7M weights, 80 % sparsity
    python bench/global_select.py --layers 12 --width 1024 --sparsity 0.9 --repeats 5
    python bench/global_select.py --small              # quick smoke run; prints, writes nothing unless --out

Methods, each timed from the dense model to the masks:
  hpcprune        hpcprune.prune.rules.select("global") over the pipeline's hpcprune.prune.scoring.LazyScores,
                  which computes |w| on every access into one reused buffer of the largest tensor's
                  size (sound because select holds one tensor's scores at a time: if it did not, the
                  masks would come out wrong and the check below would fail): scoring, selection
                  and the packed masks (numel/8 bytes) all happen inside the measured call
  global_unstr.   torch.nn.utils.prune.global_unstructured(..., L1Unstructured), until the masks exist
  kthvalue        torch.cat of all |w| + torch.kthvalue + one comparison per tensor

Every run of every method happens in its own forked child, so each measures its own peak memory:
the child's VmHWM after the method (reset just before by writing 5 to /proc/self/clear_refs) minus
its VmRSS right before it, reported as a percentage of the model's weight bytes against the
target of OVERHEAD_TARGET_PCT. Each child first runs its method once on a tiny model, so that
one-time costs that do not grow with the model (code pages the child touches first, the start of
its thread pools) are not counted. The weights have distinct magnitudes (float32 bit patterns 1.0 +
a permutation, random signs), so all methods must return identical masks; the children send back
a sha256 of the packed masks through a pipe and the run fails if they differ.

Results go to bench/results/global_select.json and bench/results/global_select.md.
"""

import argparse
import gc
import hashlib
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from hpcprune.config import PruneConfig
from hpcprune.dist.world import SingleWorld
from hpcprune.models.weights import ModelWeights
from hpcprune.prune.plan import make_plan
from hpcprune.prune.rules import select
from hpcprune.prune.scoring import LazyScores, ScoreContext
from hpcprune.prune.selection import prune_count

RESULTS = Path(__file__).resolve().parent / "results"
OVERHEAD_TARGET_PCT = 10.0  # peak memory above the dense model, in % of its prunable weights' bytes
SECONDS_TARGET = 0.6  # hpcprune's median time on the default model
SPEEDUP_TARGET = 30.0  # global_unstructured's median time / hpcprune's
OURS = ("hpcprune",)
LABELS = {
    "hpcprune": 'hpcprune: select("global") on LazyScores abs(w) (one reused buffer), packed masks',
    "global_unstructured": "torch.nn.utils.prune.global_unstructured(L1Unstructured)",
    "kthvalue": "torch.cat(abs(w)) + torch.kthvalue + masks",
}


# --- the model ---------------------------------------------------------------------------------------


def build_model(layers: int, width: int, seed: int) -> nn.Sequential:
    """Linear layers whose weights have pairwise distinct magnitudes (no ties anywhere), random signs."""
    generator = torch.Generator().manual_seed(seed)
    per_layer = width * width
    bits = torch.randperm(layers * per_layer, generator=generator, dtype=torch.int32).add_(0x3F800000)
    values = bits.view(torch.float32)
    values.mul_(torch.randint(0, 2, values.shape, generator=generator, dtype=torch.int8).mul_(2).sub_(1))
    model = nn.Sequential(*(nn.utils.skip_init(nn.Linear, width, width) for _ in range(layers)))
    with torch.no_grad():
        for index, layer in enumerate(model):
            layer.weight.copy_(values[index * per_layer : (index + 1) * per_layer].view(width, width))
            layer.bias.zero_()
    return model


# --- the methods: dense model in, {name: bool mask} out ------------------------------------------------


class LazyMagnitude(Mapping[str, torch.Tensor]):
    """The pipeline's LazyScores for magnitude, counting the accesses."""

    def __init__(self, model, plan):
        parameters = dict(model.named_parameters())
        self._specs = {spec.name: spec for spec in plan.tensors}
        self._weights = {spec.name: parameters[spec.name] for spec in plan.tensors}
        self._context = ScoreContext(seed=0)
        self._scores = LazyScores("magnitude", list(plan.tensors), ModelWeights(model), self._context)
        self.reads = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        self.reads += 1
        return self._scores[name]  # the pipeline's own LazyScores: a new tensor each time

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


def run_hpcprune(model, plan, sparsity, timings):
    scores = LazyMagnitude(model, plan)
    selection = select("global", scores, plan, SingleWorld(), sparsity=sparsity)
    timings["reads_per_tensor"] = scores.reads / len(plan.tensors)
    return selection.masks


def run_global_unstructured(model, plan, sparsity, timings):
    modules = dict(model.named_modules())
    owners = [modules[spec.name.rsplit(".", 1)[0]] for spec in plan.tensors]
    torch_prune.global_unstructured([(m, "weight") for m in owners], torch_prune.L1Unstructured, amount=sparsity)
    return {spec.name: m.weight_mask for spec, m in zip(plan.tensors, owners)}


def run_kthvalue(model, plan, sparsity, timings):
    parameters = dict(model.named_parameters())
    weights = [parameters[spec.name].detach() for spec in plan.tensors]
    if prune_count(sparsity, plan.total) == 0:  # kthvalue needs k >= 1
        return {spec.name: torch.ones_like(w, dtype=torch.bool) for spec, w in zip(plan.tensors, weights)}
    everything = torch.cat([w.reshape(-1) for w in weights]).abs_()
    boundary = torch.kthvalue(everything, prune_count(sparsity, plan.total)).values
    del everything
    return {spec.name: w.abs() > boundary for spec, w in zip(plan.tensors, weights)}


METHODS = {"hpcprune": run_hpcprune,
           "global_unstructured": run_global_unstructured, "kthvalue": run_kthvalue}


# --- measuring one run in a forked child ---------------------------------------------------------------


def proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Make VmHWM start again from the current RSS (Linux 4.0+); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def packed(mask) -> np.ndarray:
    """A mask as np.packbits bytes: hpcprune's masks already are; torch's bool/float masks get packed."""
    if isinstance(mask, np.ndarray):
        return mask
    return np.packbits(mask.detach().to(torch.bool).reshape(-1).numpy())


def masks_digest(plan, masks) -> str:
    digest = hashlib.sha256()
    for spec in plan.tensors:
        digest.update(packed(masks[spec.name]).tobytes())
    return digest.hexdigest()


def kept_count(plan, masks) -> int:
    return sum(int(np.unpackbits(packed(masks[spec.name]), count=spec.numel).sum()) for spec in plan.tensors)


def warm_up(method: str, sparsity: float) -> None:
    """Run the method once on a tiny model: first-use costs are not what the benchmark measures."""
    tiny = build_model(2, 64, seed=1)
    METHODS[method](tiny, make_plan(tiny, PruneConfig(), 1), sparsity, {})


def measure(method: str, model, plan, sparsity: float) -> dict:
    warm_up(method, sparsity)
    gc.collect()
    before = proc_status_bytes("VmRSS")
    exact_peak = reset_peak() and before is not None
    timings: dict[str, float] = {}
    started = time.perf_counter()
    masks = METHODS[method](model, plan, sparsity, timings)
    seconds = time.perf_counter() - started
    if exact_peak:
        peak = max(proc_status_bytes("VmHWM"), timings.pop("earlier_peak", 0))
    else:  # lifetime peak of this child: an upper bound of the method's own peak
        before = before or 0
        timings.pop("earlier_peak", None)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kept = kept_count(plan, masks)
    return {"seconds": seconds, **timings, "rss_before": before, "peak_rss": peak,
            "overhead_bytes": peak - before, "peak_exact": exact_peak, "kept": kept,
            "masks_sha256": masks_digest(plan, masks)}


def in_child(method: str, model, plan, sparsity: float, threads: int) -> dict:
    """Run `measure` in a forked child and read its JSON result from a pipe."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: whatever happens, it reports and exits here, never returning to the caller
        os.close(reader)
        payload = json.dumps({"error": "interrupted"})
        try:
            torch.set_num_threads(threads)
            payload = json.dumps(measure(method, model, plan, sparsity))
        except Exception as error:  # noqa: BLE001  (any failure is reported by the parent)
            payload = json.dumps({"error": f"{type(error).__name__}: {error}"})
        finally:
            with os.fdopen(writer, "w") as pipe:
                pipe.write(payload)
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        payload = pipe.read()
    os.waitpid(pid, 0)
    result = json.loads(payload) if payload else {"error": "child died without a result"}
    if "error" in result:
        raise SystemExit(f"{method}: {result['error']}")
    return result


# --- the report ----------------------------------------------------------------------------------------


def summarise(method: str, runs: list[dict], model_bytes: int) -> dict:
    seconds = [run["seconds"] for run in runs]
    overhead = max(run["overhead_bytes"] for run in runs)
    summary = {"label": LABELS[method], "seconds_median": statistics.median(seconds), "seconds_min": min(seconds),
               "overhead_bytes": overhead, "overhead_pct_of_model": 100.0 * overhead / model_bytes,
               "masks_sha256": runs[0]["masks_sha256"], "kept": runs[0]["kept"], "runs": runs}
    if "reads_per_tensor" in runs[0]:
        summary["reads_per_tensor"] = max(run["reads_per_tensor"] for run in runs)
    return summary


def compare(methods: dict) -> dict:
    """For each hpcprune variant: time ratios (medians) and whether it meets its targets."""
    verdicts = {}
    for ours in OURS:
        seconds, overhead = methods[ours]["seconds_median"], methods[ours]["overhead_pct_of_model"]
        versus_torch = methods["global_unstructured"]["seconds_median"] / seconds
        verdicts[ours] = {
            "speedup_vs_global_unstructured": versus_torch,
            "speedup_vs_kthvalue": methods["kthvalue"]["seconds_median"] / seconds,
            "overhead_pct_of_model": overhead,
            "overhead_target_met": overhead <= OVERHEAD_TARGET_PCT,
            "speedup_target_met": versus_torch >= SPEEDUP_TARGET,
            "seconds_target_met": seconds <= SECONDS_TARGET,
        }
    return verdicts


def run_session(model, plan, sparsity: float, threads: int, repeats: int, model_bytes: int) -> dict:
    """Every method `repeats` times, each run in its own child; with the load average around it."""
    load_before = os.getloadavg()
    runs = {method: [in_child(method, model, plan, sparsity, threads) for _ in range(repeats)] for method in METHODS}
    methods = {method: summarise(method, method_runs, model_bytes) for method, method_runs in runs.items()}
    return {"load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "methods": methods, "targets": compare(methods)}


def table(methods: dict) -> list[str]:
    lines = ["| method | seconds (median) | seconds (min) | peak memory overhead | overhead / model bytes |",
             "|---|---:|---:|---:|---:|"]
    for summary in methods.values():
        lines.append(f"| {summary['label']} | {summary['seconds_median']:.3f} | {summary['seconds_min']:.3f} | "
                     f"{summary['overhead_bytes'] / 2**20:.1f} MiB | {summary['overhead_pct_of_model']:.1f} % |")
    return lines


def verdict_lines(methods: dict, targets: dict) -> list[str]:
    def met(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = []
    for ours, verdict in targets.items():
        lines.append(
            f"{ours}: overhead {verdict['overhead_pct_of_model']:.1f} % of the model's bytes (target <= "
            f"{OVERHEAD_TARGET_PCT:g} %: {met(verdict['overhead_target_met'])}); "
            f"{methods[ours]['seconds_median']:.3f} s (target <= {SECONDS_TARGET:g} s: "
            f"{met(verdict['seconds_target_met'])}); global_unstructured / {ours} "
            f"{verdict['speedup_vs_global_unstructured']:.1f}x (target >= {SPEEDUP_TARGET:g}x: "
            f"{met(verdict['speedup_target_met'])}); kthvalue / {ours} {verdict['speedup_vs_kthvalue']:.1f}x.")
    return lines


def markdown(report: dict) -> str:
    setup, methods, sessions = report["setup"], report["methods"], report["sessions"]
    described = (
        f"Model: {setup['layers']} x Linear({setup['width']}, {setup['width']}), {setup['prunable']:,} prunable "
        f"weights ({setup['model_bytes'] / 2**20:.1f} MiB float32), sparsity {setup['sparsity']}, "
        f"{setup['threads']} torch threads on {setup['cores']} cores ({setup['cpu']}), torch {setup['torch']}, "
        f"numpy {setup['numpy']}. Each run in its own forked child after a warm-up on a tiny model; "
        f"{len(sessions)} session(s) back to back, {setup['repeats']} run(s) per method in each; the machine "
        f"is shared, so every session is shown."
    )
    lines = ["# Global magnitude selection: hpcprune vs torch", "", described, "",
             f"## All {len(sessions)} sessions together (median and min over all runs, overhead: max)", "",
             *table(methods), "", *(f"- {line}" for line in verdict_lines(methods, report["targets"]))]
    for index, session in enumerate(sessions, 1):
        lines += ["", f"## Session {index} (load average before / after: {session['load_before']} / "
                      f"{session['load_after']})", "", *table(session["methods"]), "",
                  *(f"- {line}" for line in verdict_lines(session["methods"], session["targets"]))]
    ours = methods["hpcprune"]
    notes = [
        (f"What hpcprune holds at its peak: the packed masks ({setup['packed_mask_bytes'] / 2**20:.1f} MiB, "
         f"{100 * setup['packed_mask_bytes'] / setup['model_bytes']:.1f} % of the model's bytes), one tensor's abs(w) "
         f"(largest {setup['largest_score_bytes'] / 2**20:.1f} MiB, "
         f"{100 * setup['largest_score_bytes'] / setup['model_bytes']:.1f} %), chunk buffers and histograms. "
         "LazyScores writes every tensor's abs(w) into one buffer: allocating a new tensor per access "
         "costs about one more tensor of resident memory, because glibc's malloc does not hand a freed "
         "block of that size straight back to the next equally large, aligned request."),
        (f"hpcprune read each tensor's scores {ours['reads_per_tensor']:g} times (one per pass; each read "
         f"recomputes abs(w)); times include that scoring."),
        (f"Masks identical across all methods (sha256 of packed masks): {report['masks_identical']}; "
         f"kept {ours['kept']:,} of {setup['prunable']:,}."),
        ("Overhead = child's peak RSS during the method minus its RSS right before it (the dense model is "
         "already there); it includes the method's outputs."),
    ]
    lines += ["", "## Notes", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=3, help="forked runs per method in each session")
    parser.add_argument("--sessions", type=int, default=2, help="back-to-back sessions (the machine may be shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="4 x Linear(256, 256), one run each, no files")
    parser.add_argument("--out", type=Path, help="stem of the result files (default bench/results/global_select)")
    args = parser.parse_args()
    if args.small:
        args.layers, args.width, args.repeats, args.sessions = 4, 256, 1, 1
    out = args.out or (None if args.small else RESULTS / "global_select")

    # The parent stays single-threaded: a forked child cannot use an OpenMP pool its parent started.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build_model(args.layers, args.width, args.seed)
    plan = make_plan(model, PruneConfig(), 1)
    model_bytes = plan.total * 4

    sessions = [run_session(model, plan, args.sparsity, threads, args.repeats, model_bytes)
                for _ in range(args.sessions)]
    methods = {method: summarise(method, [run for session in sessions for run in session["methods"][method]["runs"]],
                                 model_bytes) for method in METHODS}
    digests = {summary["masks_sha256"] for session in sessions for summary in session["methods"].values()}
    expected_kept = plan.total - prune_count(args.sparsity, plan.total)
    report = {
        "setup": {"layers": args.layers, "width": args.width, "sparsity": args.sparsity, "repeats": args.repeats,
                  "sessions": args.sessions, "prunable": plan.total, "model_bytes": model_bytes,
                  "packed_mask_bytes": sum((spec.numel + 7) // 8 for spec in plan.tensors),
                  "largest_score_bytes": 4 * max(spec.numel for spec in plan.tensors),
                  "overhead_target_pct": OVERHEAD_TARGET_PCT, "threads": threads,
                  "cores": len(os.sched_getaffinity(0)), "cpu": _cpu_name(), "torch": torch.__version__,
                  "numpy": np.__version__, "python": platform.python_version()},
        "methods": methods,
        "targets": compare(methods),
        "masks_identical": len(digests) == 1 and all(s["kept"] == expected_kept for s in methods.values()),
        "sessions": sessions,
    }
    text = markdown(report)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)
    if not report["masks_identical"]:
        raise SystemExit("masks differ between methods")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
