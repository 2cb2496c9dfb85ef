"""Benchmark of exact global magnitude selection: hpcprune against two plain-torch ways.

    python bench/select.py                      # 24 x Linear(2048, 2048), ~100.7M weights, 80 % sparsity
    python bench/select.py --layers 12 --width 1024 --sparsity 0.9 --repeats 5
    python bench/select.py --small              # quick smoke run; prints, writes nothing unless --out

Methods, each timed from the dense model to the masks:
  hpcprune        hpcprune.scoring.magnitude per tensor + hpcprune.select.select("global") (masks included)
  global_unstr.   torch.nn.utils.prune.global_unstructured(..., L1Unstructured), until the masks exist
  kthvalue        torch.cat of all |w| + torch.kthvalue + one comparison per tensor

Every run of every method happens in its own forked child, so each measures its own peak memory:
the child's VmHWM after the method (reset just before by writing 5 to /proc/self/clear_refs) minus
its VmRSS right before it. The weights have distinct magnitudes (float32 bit patterns 1.0 + a
permutation, random signs), so all three must return identical masks; the children send back a
sha256 of the packed masks through a pipe and the run fails if they differ.

Results go to bench/results/select.json and bench/results/select.md.
"""

import os
import sys

# This file shares its name with the standard library's `select`, which subprocess and friends
# import: keep its own folder off the import path, and make the repository importable instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse
import gc
import hashlib
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from hpcprune.config import PruneConfig
from hpcprune.plan import make_plan
from hpcprune.scoring import ScoreContext, magnitude
from hpcprune.select import prune_count, select
from hpcprune.world import SingleWorld

RESULTS = Path(_HERE) / "results"
LABELS = {
    "hpcprune": 'hpcprune: magnitude scores + select("global") + masks',
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


def run_hpcprune(model, plan, sparsity, timings):
    parameters = dict(model.named_parameters())
    started = time.perf_counter()
    context = ScoreContext(seed=0)
    scores = {spec.name: magnitude(spec, parameters[spec.name], context) for spec in plan.tensors}
    timings["score_s"] = time.perf_counter() - started
    # Selection's own memory: its peak above the RSS with the scores in place, less the masks it returns.
    timings["earlier_peak"] = proc_status_bytes("VmHWM") or 0
    scored = proc_status_bytes("VmRSS")
    exact = reset_peak() and scored is not None
    started_select = time.perf_counter()
    selection = select("global", scores, plan, SingleWorld(), sparsity=sparsity)
    timings["select_s"] = time.perf_counter() - started_select
    if exact:
        mask_bytes = sum(mask.numel() * mask.element_size() for mask in selection.masks.values())
        timings["select_temporary_bytes"] = proc_status_bytes("VmHWM") - scored - mask_bytes
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


METHODS = {"hpcprune": run_hpcprune, "global_unstructured": run_global_unstructured, "kthvalue": run_kthvalue}


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


def masks_digest(plan, masks) -> str:
    digest = hashlib.sha256()
    for spec in plan.tensors:
        digest.update(np.packbits(masks[spec.name].detach().to(torch.bool).reshape(-1).numpy()).tobytes())
    return digest.hexdigest()


def measure(method: str, model, plan, sparsity: float) -> dict:
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
    kept = sum(int(mask.detach().to(torch.bool).sum()) for mask in masks.values())
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
    for part in ("score_s", "select_s"):
        if part in runs[0]:
            summary[part + "_median"] = statistics.median(run[part] for run in runs)
    if "select_temporary_bytes" in runs[0]:
        summary["select_temporary_bytes"] = max(run["select_temporary_bytes"] for run in runs)
    return summary


def markdown(report: dict) -> str:
    setup, methods = report["setup"], report["methods"]
    described = (
        f"Model: {setup['layers']} x Linear({setup['width']}, {setup['width']}), {setup['prunable']:,} prunable "
        f"weights ({setup['model_bytes'] / 2**20:.1f} MiB float32), sparsity {setup['sparsity']}, "
        f"{setup['threads']} torch threads on {setup['cores']} cores ({setup['cpu']}), torch {setup['torch']}. "
        f"Each run in its own forked child; {setup['repeats']} run(s) per method; load average before/after: "
        f"{setup['load_before']} / {setup['load_after']}."
    )
    lines = [
        "# Global magnitude selection: hpcprune vs torch",
        "",
        described,
        "",
        "| method | seconds (median) | seconds (min) | peak memory overhead | overhead / model bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for summary in methods.values():
        lines.append(f"| {summary['label']} | {summary['seconds_median']:.3f} | {summary['seconds_min']:.3f} | "
                     f"{summary['overhead_bytes'] / 2**20:.0f} MiB | {summary['overhead_pct_of_model']:.0f} % |")
    ours = methods["hpcprune"]
    temporary = ours.get("select_temporary_bytes", float("nan")) / 2**20
    notes = [
        (f"hpcprune split (median): scoring {ours['score_s_median']:.3f} s, selection + masks "
         f"{ours['select_s_median']:.3f} s. Selection's own temporary memory (peak above the RSS with the "
         f"scores in place, less the returned masks): {temporary:.1f} MiB."),
        (f"global_unstructured / hpcprune time: {report['speedup_vs_global_unstructured']:.1f}x; "
         f"kthvalue / hpcprune time: {report['speedup_vs_kthvalue']:.1f}x (medians)."),
        (f"Masks identical across the three methods (sha256 of packed masks): {report['masks_identical']}; "
         f"kept {ours['kept']:,} of {setup['prunable']:,}."),
        ("Overhead = child's peak RSS during the method minus its RSS right before it; it includes the "
         "method's outputs (hpcprune: the float32 scores and the bool masks)."),
    ]
    lines += ["", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=3, help="forked runs per method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="4 x Linear(256, 256), one run each, no files")
    parser.add_argument("--out", type=Path, help="stem of the result files (default bench/results/select)")
    args = parser.parse_args()
    if args.small:
        args.layers, args.width, args.repeats = 4, 256, 1
    out = args.out or (None if args.small else RESULTS / "select")

    # The parent stays single-threaded: a forked child cannot use an OpenMP pool its parent started.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build_model(args.layers, args.width, args.seed)
    plan = make_plan(model, PruneConfig(), 1)
    model_bytes = plan.total * 4
    load_before = os.getloadavg()

    runs = {method: [in_child(method, model, plan, args.sparsity, threads) for _ in range(args.repeats)]
            for method in METHODS}
    methods = {method: summarise(method, method_runs, model_bytes) for method, method_runs in runs.items()}
    digests = {summary["masks_sha256"] for summary in methods.values()}
    expected_kept = plan.total - prune_count(args.sparsity, plan.total)
    report = {
        "setup": {"layers": args.layers, "width": args.width, "sparsity": args.sparsity, "repeats": args.repeats,
                  "prunable": plan.total, "model_bytes": model_bytes, "threads": threads,
                  "cores": len(os.sched_getaffinity(0)), "cpu": _cpu_name(), "torch": torch.__version__,
                  "numpy": np.__version__, "python": platform.python_version(),
                  "load_before": [round(x, 2) for x in load_before],
                  "load_after": [round(x, 2) for x in os.getloadavg()]},
        "methods": methods,
        "masks_identical": len(digests) == 1 and all(s["kept"] == expected_kept for s in methods.values()),
        "speedup_vs_global_unstructured": methods["global_unstructured"]["seconds_median"]
        / methods["hpcprune"]["seconds_median"],
        "speedup_vs_kthvalue": methods["kthvalue"]["seconds_median"] / methods["hpcprune"]["seconds_median"],
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
