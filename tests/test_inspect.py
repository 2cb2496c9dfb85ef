"""`hpcprune inspect`: summary, layers, diff and masks on archives of real runs, text and JSON.

Each run happens once per module (fixtures below); the expected figures are read back from the
archive with plain h5py/numpy and from the recorded state files with safetensors, never from
hpcprune's own reader.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hpcprune.archive.codec import pack_mask
from hpcprune.archive.reader import FORMAT_VERSION
from hpcprune.archive.writer import Archive
from hpcprune.config import RunConfig
from hpcprune.read.summary import render_summary, summary
from tests.conftest import missing
from tests.helpers import ROOT, run_cli
from tests.inspect_runs import (
    ONESHOT,
    SMOKE,
    copy_run,
    mask_bits,
    older_format,
    prune,
    round_attrs,
    run_main,
    truncated,
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return prune(tmp_path_factory.mktemp("smoke"), SMOKE)


@pytest.fixture(scope="module")
def magnitude(tmp_path_factory):
    return prune(tmp_path_factory.mktemp("magnitude"), ONESHOT)


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    return prune(tmp_path_factory.mktemp("random"), ONESHOT, "prune.criterion=random")


@pytest.fixture
def cli(capsys, monkeypatch):
    """`hpcprune ARGS` through the CLI's entry point in this process: (exit status, stdout, stderr)."""
    return lambda *args: run_main(list(args), capsys, monkeypatch)


@pytest.fixture
def inspect_json(cli):
    def run(*args: str) -> dict:
        status, out, err = cli("inspect", *args, "--json")
        assert status == 0, err
        return json.loads(out)
    return run


def text_of(cli, *args: str) -> str:
    status, out, err = cli(*args)
    assert status == 0, err
    return out


# --- summary -----------------------------------------------------------------------------------------


def test_summary_json_and_text_carry_the_recorded_figures(smoke, cli, inspect_json):
    facts = inspect_json(str(smoke))  # `inspect ARCHIVE` alone means summary
    assert facts == inspect_json("summary", str(smoke))
    with h5py.File(smoke, "r") as archive:
        events = [(row["time"].decode(), row["kind"].decode()) for row in archive["events"][()]]
        world_size, host = int(archive.attrs["world_size"]), archive.attrs["host"]
    assert [kind for _, kind in events] == ["start", "finish"]
    assert facts["started"] == events[0][0] and facts["finished"] == events[1][0]
    assert facts["resumes"] == 0 and facts["interruptions"] == 0
    assert facts["world_size"] == world_size == 1 and host == socket.gethostname() == facts["host"]
    assert facts["config"]["prune"]["sparsity"] == 0.75
    assert facts["config_changes"]["schedule.rounds"] == 3 and "prune.criterion" not in facts["config_changes"]
    assert [r["index"] for r in facts["rounds"]] == [1, 2, 3]
    for row in facts["rounds"]:
        stored = round_attrs(smoke, row["index"])
        assert row["kept"] == int(stored["kept"]) == sum(int(bits.sum()) for bits in mask_bits(smoke, row["index"]).values())
        assert row["threshold"] == stored["threshold"] and row["accuracy"] == stored["accuracy"]
        assert row["stages"] == {stage: stored[f"seconds_{stage}"] for stage in ("select", "finetune", "record", "write")}

    text = text_of(cli, "inspect", str(smoke))
    for row in facts["rounds"]:
        line = next(line for line in text.splitlines() if line.split()[:3] == [str(row["index"]), "magnitude", "global"])
        assert f"{row['kept']}/{row['total']}" in line and f"{100 * row['achieved_sparsity']:.4f} %" in line
        assert line.split()[-4:] == [f"{row['stages'][stage]:.2f}" for stage in ("select", "finetune", "record", "write")]
    assert f"started {events[0][0]}, finished {events[1][0]}; 0 resume(s), 0 interruption(s)" in text
    assert "schedule.rounds=3" in text and f"host {host}" in text


def test_summary_counts_resumes_from_the_events(smoke, tmp_path, inspect_json):
    resumed = copy_run(smoke, tmp_path)
    Archive.at(resumed).record_event("interrupt", "SIGTERM")
    Archive.at(resumed).record_event("resume", "after round 3 on 1 rank(s)")
    facts = inspect_json(str(resumed))
    assert facts["resumes"] == 1 and facts["interruptions"] == 1
    assert [event["kind"] for event in facts["events"]] == ["start", "finish", "interrupt", "resume"]


# --- layers ------------------------------------------------------------------------------------------


def test_layers_recomputes_the_scores_the_round_selected_on(smoke, cli, inspect_json):
    facts = inspect_json("layers", str(smoke), "--round", "2")
    assert facts["round"] == 2 and facts["scores"]["consistent"] is True
    threshold = float(round_attrs(smoke, 2)["threshold"])
    assert facts["threshold"] == threshold
    before, after = mask_bits(smoke, 1), mask_bits(smoke, 2)
    state = smoke.with_name("run.h5.states") / "round-0001.safetensors"  # round 2 scores the weights round 1 left
    assert facts["scores"]["source"] == str(state)
    with safe_open(state, "pt") as weights:
        for row in facts["layers"]:
            scores = weights.get_tensor(row["name"]).abs().reshape(-1).numpy()  # magnitude, by hand
            alive, kept = before[row["name"]], after[row["name"]]
            assert row["kept"] == int(kept.sum()) and row["numel"] == kept.size
            assert row["sparsity"] == pytest.approx(1 - kept.mean())
            assert row["score_min"] == float(scores[alive].min()) and row["score_max"] == float(scores[alive].max())
            assert row["score_mean"] == pytest.approx(float(scores[alive].astype(np.float64).mean()), rel=1e-9)
            assert row["max_pruned"] == float(scores[alive & ~kept].max()) <= threshold
            assert row["min_kept"] == float(scores[kept].min()) >= threshold
    text = text_of(cli, "inspect", "layers", str(smoke), "--round", "2")
    assert "they select the recorded masks" in text
    fc1 = next(line for line in text.splitlines() if line.startswith("fc1.weight"))
    assert fc1.split()[:4] == ["fc1.weight", "300x784", "235200", str(facts["layers"][0]["kept"])]


def test_layers_says_when_the_state_file_no_longer_matches(smoke, tmp_path, cli, inspect_json):
    changed = copy_run(smoke, tmp_path / "changed")
    state = changed.with_name("run.h5.states") / "round-0001.safetensors"
    tensors = load_file(state)
    tensors["fc1.weight"] = tensors["fc1.weight"].flip(0)  # same values, other places
    from safetensors.torch import save_file
    save_file(tensors, state)
    facts = inspect_json("layers", str(changed), "--round", "2")
    assert facts["scores"]["consistent"] is False
    assert [row["consistent"] for row in facts["layers"]] == [False, True, True]
    assert "do NOT select the recorded masks" in text_of(cli, "inspect", "layers", str(changed), "--round", "2")

    gone = copy_run(smoke, tmp_path / "gone")
    for state in gone.with_name("run.h5.states").iterdir():
        state.unlink()
    facts = inspect_json("layers", str(gone))
    assert "not beside the archive" in facts["scores"]["unavailable"]
    assert facts["layers"][0]["score_mean"] is None and facts["layers"][0]["kept"] == int(mask_bits(smoke, 3)["fc1.weight"].sum())


@pytest.mark.parametrize("settings, reason", [
    (("prune.granularity=channel", "prune.criterion=l1"), "granularity channel scores whole channels"),
    (("prune.criterion=wanda",), "criterion wanda scores with calibration data"),
])
def test_scores_that_cannot_be_recomputed_are_left_out_with_the_reason(settings, reason, tmp_path, cli, inspect_json):
    run = prune(tmp_path, ONESHOT, *settings)
    facts = inspect_json("layers", str(run))
    assert reason in facts["scores"]["unavailable"] and facts["scores"]["consistent"] is None
    assert all(row["score_mean"] is None for row in facts["layers"])
    assert [row["kept"] for row in facts["layers"]] == [int(bits.sum()) for bits in mask_bits(run, 1).values()]
    assert f"score statistics unavailable: {reason}" in text_of(cli, "inspect", "layers", str(run))
    assert f"left out scores_round_0001: {reason}" in text_of(cli, "inspect", "plot", str(run), "--out", str(tmp_path / "plots"))


# --- diff --------------------------------------------------------------------------------------------


def test_diff_of_a_run_with_itself_is_identical(magnitude, cli, inspect_json):
    facts = inspect_json("diff", str(magnitude), str(magnitude))
    assert facts["identical"] is True and facts["jaccard"] == 1.0
    assert all(t["identical"] and t["jaccard"] == 1.0 and t["kept_a"] == t["kept_b"] == t["both"] for t in facts["tensors"])
    assert [m["a"] for m in facts["metrics"]] == [m["b"] for m in facts["metrics"]] and facts["config"] == []
    assert "identical masks" in text_of(cli, "inspect", "diff", str(magnitude), str(magnitude))


def test_diff_of_two_criteria_measures_their_overlap(magnitude, random_run, cli, inspect_json):
    facts = inspect_json("diff", str(magnitude), str(random_run))
    a, b = mask_bits(magnitude, 1), mask_bits(random_run, 1)
    both = {name: int((a[name] & b[name]).sum()) for name in a}
    either = {name: int((a[name] | b[name]).sum()) for name in a}
    assert [t["name"] for t in facts["tensors"]] == list(a)
    for tensor in facts["tensors"]:
        name = tensor["name"]
        assert tensor["both"] == both[name] and tensor["either"] == either[name]
        assert tensor["jaccard"] == both[name] / either[name] and tensor["identical"] is False
    assert facts["jaccard"] == sum(both.values()) / sum(either.values())
    # 20 % kept by each: two unrelated choices overlap near 0.2^2 / (0.2 + 0.2 - 0.2^2) = 0.11
    assert 0.05 < facts["jaccard"] < 0.25
    assert {"key": "prune.criterion", "a": "magnitude", "b": "random"} in facts["config"]
    metrics = {m["name"]: (m["a"], m["b"]) for m in facts["metrics"]}
    assert metrics["criterion"] == ("magnitude", "random")
    assert metrics["kept"] == (int(round_attrs(magnitude, 1)["kept"]), int(round_attrs(random_run, 1)["kept"]))
    text = text_of(cli, "inspect", "diff", str(magnitude), str(random_run))
    assert f"masks differ: Jaccard {facts['jaccard']:.4f}" in text
    assert re.search(r"prune\.criterion\s+magnitude\s+random", text)


def test_diff_finds_a_two_rank_run_identical_to_a_one_rank_run(mpirun, mpi4py, magnitude, tmp_path, cli, inspect_json):
    out = tmp_path / "two.h5"
    finished = subprocess.run([mpirun, "-n", "2", sys.executable, "-m", "hpcprune", "prune", "--config", ONESHOT,
                               "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert finished.returncode == 0, finished.stderr
    facts = inspect_json(str(out))
    assert facts["world_size"] == 2 and facts["backend"] == "mpi"
    assert facts["events"][0]["detail"].startswith("2 rank(s)")
    assert inspect_json("diff", str(magnitude), str(out))["identical"] is True


def test_diff_refuses_runs_of_different_models(smoke, magnitude, cli):
    status, _, stderr = cli("inspect", "diff", str(smoke), str(magnitude))
    assert status == 2 and "prune different tensors" in stderr and stderr.count("\n") == 1


# --- masks -------------------------------------------------------------------------------------------


def test_masks_export_is_a_safetensors_file_of_the_rounds_bool_masks(smoke, tmp_path, cli):
    out = tmp_path / "masks.safetensors"
    assert "round 2, 3 masks, 266200 bytes" in text_of(cli, "inspect", "masks", str(smoke), "--round", "2", "--out", str(out))
    exported = load_file(out)
    expected = mask_bits(smoke, 2)
    assert list(exported) == sorted(expected)
    for name, bits in expected.items():
        assert exported[name].dtype == torch.bool
        assert torch.equal(exported[name].reshape(-1), torch.from_numpy(bits))
    with safe_open(out, "pt") as file:
        assert file.metadata() == {"archive": "run.h5", "round": "2"}
        assert list(file.get_slice("fc1.weight").get_shape()) == [300, 784]
    before = out.read_bytes()
    status, _, stderr = cli("inspect", "masks", str(smoke), "--out", str(out))
    assert status == 2 and "--force" in stderr and out.read_bytes() == before
    assert cli("inspect", "masks", str(smoke), "--out", str(out), "--force")[0] == 0
    assert torch.equal(load_file(out)["fc2.weight"].reshape(-1), torch.from_numpy(mask_bits(smoke, 3)["fc2.weight"]))


# --- what a user can get wrong -----------------------------------------------------------------------


VIEWS = {
    "summary": lambda path, out: ["inspect", path],
    "layers": lambda path, out: ["inspect", "layers", path, "--json"],
    "diff": lambda path, out: ["inspect", "diff", path, path],
    "plot": lambda path, out: ["inspect", "plot", path, "--out", str(out / "plots")],
    "masks": lambda path, out: ["inspect", "masks", path, "--out", str(out / "masks.safetensors")],
    "report": lambda path, out: ["report", path, "--out", str(out / "report.html")],
}


@pytest.mark.parametrize("view", VIEWS)
def test_older_format_and_truncated_archives_are_one_line_errors(view, magnitude, tmp_path, cli):
    cases = {"older": (older_format(magnitude, tmp_path / "old"), "older archive format (0)"),
             "truncated": (truncated(magnitude, tmp_path / "cut"), "is not a readable hpcprune archive")}
    for damaged, expected in cases.values():
        out = tmp_path / "out"
        status, stdout, stderr = cli(*VIEWS[view](str(damaged), out))
        assert status == 2 and stdout == ""
        assert stderr.count("\n") == 1 and stderr.startswith(f"hpcprune: error: {damaged}") and expected in stderr
        assert not out.exists()  # nothing written


def test_a_damaged_archive_is_refused_by_the_real_process(magnitude, tmp_path):
    finished = run_cli("inspect", "layers", str(truncated(magnitude, tmp_path)))
    assert finished.returncode == 2 and "Traceback" not in finished.stderr
    assert finished.stderr.strip().count("\n") == 0 and "not a readable hpcprune archive" in finished.stderr


def test_unknown_round_is_a_usage_error(smoke, cli):
    status, _, stderr = cli("inspect", "layers", str(smoke), "--round", "7")
    assert status == 2 and "no complete round 7 (complete: 1, 2, 3)" in stderr


# --- the README's h5py snippet -----------------------------------------------------------------------


def test_readme_snippet_reads_a_mask_with_plain_h5py(smoke):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(import h5py.*?)```", readme, re.S).group(1)
    assert '"runs/quickstart.h5"' in snippet and '"rounds/0003/masks/fc1.weight"' in snippet
    namespace: dict = {}
    exec(compile(snippet.replace("print(", "result = (").replace('"runs/quickstart.h5"', repr(str(smoke))),
                 "README.md", "exec"), namespace)
    mean, accuracy = namespace["result"]
    assert mean == pytest.approx(mask_bits(smoke, 3)["fc1.weight"].mean())
    assert accuracy == round_attrs(smoke, 3)["accuracy"]


def test_h5dump_reads_a_mask_without_hpcprune(smoke):
    if shutil.which("h5dump") is None:
        missing("h5dump", "apt-get install hdf5-tools")
    dumped = subprocess.run(["h5dump", "-y", "-d", "/rounds/0003/masks/fc3.weight", "-w", "0", str(smoke)],
                            capture_output=True, text=True, timeout=60)
    assert dumped.returncode == 0, dumped.stderr
    data = re.search(r"DATA \{\s*([\d,\s]+?)\s*\}", dumped.stdout).group(1)  # gzip and fletcher32 undone by HDF5 itself
    packed = np.array([int(value) for value in data.split(",")], dtype=np.uint8)
    assert np.array_equal(np.unpackbits(packed, count=1000).astype(bool), mask_bits(smoke, 3)["fc3.weight"])
    assert 'ATTRIBUTE "kept"' in dumped.stdout


# --- the summary of hand-built archives: exact figures, and an archive without rounds ----------------

SHAPES = {"fc1.weight": (30, 20), "fc2.weight": (10, 30)}


def make_run(path) -> dict[int, dict[str, torch.Tensor]]:
    params = [(name, shape, True) for name, shape in SHAPES.items()] + [("fc1.bias", (30,), False)]
    archive = Archive.create(path, config_yaml=RunConfig().to_yaml(), model_name="lenet300", params=params,
                             world_size=2, backend="mpi")
    archive.write_dense(accuracy=0.91, loss=0.25, seconds=3.0, history=[], state_file=None)
    generator = torch.Generator().manual_seed(0)
    written = {}
    for index, density in ((1, 0.5), (2, 0.2)):
        masks = {name: torch.rand(shape, generator=generator) < density for name, shape in SHAPES.items()}
        kept = {name: int(mask.sum()) for name, mask in masks.items()}
        total = sum(mask.numel() for mask in masks.values())
        attrs = dict(criterion="magnitude", rule="global", target_sparsity=1 - density,
                     achieved_sparsity=1 - sum(kept.values()) / total, threshold=None if index == 1 else 0.125,
                     kept=sum(kept.values()), total=total, accuracy=0.9 - 0.01 * index, loss=0.3,
                     seconds_select=1.0, seconds_finetune=2.0, seconds_record=3.0, state_file=None)
        archive.write_round(index, attrs=attrs,
                            masks={name: (pack_mask(mask), mask.shape, kept[name]) for name, mask in masks.items()},
                            layers=[dict(name=name, numel=mask.numel(), kept=kept[name],
                                         sparsity=1 - kept[name] / mask.numel()) for name, mask in masks.items()],
                            history=[])
        written[index] = masks
    return written


def test_summary_has_the_recorded_figures(tmp_path):
    path = tmp_path / "run.h5"
    masks = make_run(path)
    facts = summary(path)
    json.dumps(facts, allow_nan=False)  # strict JSON: no NaN
    assert facts["model"] == "lenet300" and facts["num_params"] == 600 + 300 + 30
    assert facts["world_size"] == 2 and facts["backend"] == "mpi" and facts["format_version"] == FORMAT_VERSION
    assert facts["dense"] == {"accuracy": 0.91, "loss": 0.25, "seconds": 3.0}
    assert [r["index"] for r in facts["rounds"]] == [1, 2]
    assert facts["rounds"][0]["threshold"] is None and facts["rounds"][1]["threshold"] == 0.125
    assert facts["rounds"][1]["kept"] == sum(int(m.sum()) for m in masks[2].values())
    with h5py.File(path, "r") as file:
        written = float(file["rounds/0002"].attrs["seconds_write"])  # measured by the archive itself
    assert facts["rounds"][1]["seconds"] == pytest.approx(6.0 + written)
    last = {layer["name"]: layer for layer in facts["layers"]}
    assert last["fc1.weight"]["shape"] == "30x20" and last["fc1.weight"]["kept"] == int(masks[2]["fc1.weight"].sum())


def test_render_shows_round_rows_and_layer_names(tmp_path):
    path = tmp_path / "run.h5"
    make_run(path)
    facts = summary(path)
    text = render_summary(facts)
    lines = text.splitlines()
    second = facts["rounds"][1]
    row = next(line for line in lines if line.split()[:2] == ["2", "magnitude"])
    assert f"{second['kept']}/{second['total']}" in row and f"{100 * second['achieved_sparsity']:.4f} %" in row
    assert "0.125" in row and "88.00 %" in row
    assert any(line.split()[:2] == ["1", "magnitude"] for line in lines)
    assert "layers of round 2" in text
    assert any(line.startswith("fc2.weight") and "10x30" in line for line in lines)
    assert "91.00 %" in text and "lenet300" in text


def test_render_of_an_archive_without_rounds(tmp_path):
    path = tmp_path / "run.h5"
    Archive.create(path, config_yaml=RunConfig().to_yaml(), model_name="lenet5", params=[("w", (2, 2), True)],
                   world_size=1, backend="single")
    text = render_summary(summary(path))
    assert "no complete rounds" in text and "dense     not recorded" in text
