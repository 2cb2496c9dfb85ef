"""`hpcprune inspect plot` and `hpcprune report` on archives of real runs.

The plots are checked twice: as files (valid PNGs) and as drawn data (bar heights, lines and
histogram counts against the archive read with h5py). The report is opened in headless Chromium,
which must load it and decode every embedded figure.
"""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import tempfile
from pathlib import Path

import h5py
import pytest
from PIL import Image

from hpcprune.read.plots import figures
from tests.conftest import missing
from tests.inspect_runs import ONESHOT, SMOKE, mask_bits, prune, round_attrs, run_main

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Added to a copy of the page: once everything has loaded, write each image's decoded size into the DOM.
PROBE = """<script>window.addEventListener('load', () => {
  const out = document.createElement('pre'); out.id = 'image-sizes';
  out.textContent = Array.from(document.images, image => image.naturalWidth + 'x' + image.naturalHeight).join(' ');
  document.body.appendChild(out);
});</script>"""
SMOKE_FIGURES = {"sparsity_per_layer", "accuracy_vs_sparsity", "finetune", "scores_round_0001", "scores_round_0002",
                 "scores_round_0003"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return prune(tmp_path_factory.mktemp("smoke"), SMOKE)


@pytest.fixture
def cli(capsys, monkeypatch):
    return lambda *args: run_main(list(args), capsys, monkeypatch)


def test_plot_writes_every_figure_as_a_valid_png(smoke, tmp_path, cli):
    status, out, err = cli("inspect", "plot", str(smoke), "--out", str(tmp_path / "plots"))
    assert status == 0, err
    assert sorted(out.splitlines()) == sorted(f"wrote {tmp_path / 'plots' / name}.png" for name in SMOKE_FIGURES)
    assert {path.stem for path in (tmp_path / "plots").iterdir()} == SMOKE_FIGURES  # no temporary left behind
    for path in (tmp_path / "plots").iterdir():
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_plots_draw_the_recorded_figures(smoke):
    drawn = figures(smoke)
    try:
        assert set(drawn.figures) == SMOKE_FIGURES and drawn.skipped == {}
        bars = drawn.figures["sparsity_per_layer"].axes[0].containers
        for round_index, container in enumerate(bars, start=1):
            expected = [100 * (1 - bits.mean()) for bits in mask_bits(smoke, round_index).values()]
            assert [patch.get_height() for patch in container] == pytest.approx(expected)

        accuracy_axes = drawn.figures["accuracy_vs_sparsity"].axes[0]
        x, y = accuracy_axes.lines[0].get_data()
        with h5py.File(smoke, "r") as archive:
            dense = archive["dense"].attrs["accuracy"]
            epochs = len(archive["dense/history"]) + sum(len(archive[f"rounds/{i:04d}/history"]) for i in (1, 2, 3))
        assert list(x) == pytest.approx([0] + [100 * round_attrs(smoke, i)["achieved_sparsity"] for i in (1, 2, 3)])
        assert list(y) == pytest.approx([100 * dense] + [100 * round_attrs(smoke, i)["accuracy"] for i in (1, 2, 3)])
        assert len(drawn.figures["finetune"].axes[0].lines[0].get_xdata()) == epochs == 4

        for round_index in (1, 2, 3):
            axes = drawn.figures[f"scores_round_{round_index:04d}"].axes[0]
            threshold = next(line for line in axes.lines if line.get_label().startswith("threshold"))
            assert threshold.get_xdata()[0] == pytest.approx(round_attrs(smoke, round_index)["threshold"])
            # Every weight still in play is counted once: all of them in round 1, round r-1's kept ones after.
            in_play = sum(int(bits.sum()) for bits in mask_bits(smoke, round_index - 1).values()) if round_index > 1 \
                else int(round_attrs(smoke, 1)["total"])
            assert sum(patch.get_height() for patch in axes.patches) == in_play
    finally:
        drawn.close()


def test_figures_without_data_are_left_out_with_the_reason(tmp_path, cli):
    run = prune(tmp_path, ONESHOT)  # no training at all
    status, out, err = cli("inspect", "plot", str(run), "--out", str(tmp_path / "plots"))
    assert status == 0, err
    assert "left out finetune: no training was recorded (no epochs)" in out
    assert sorted(path.stem for path in (tmp_path / "plots").iterdir()) == [
        "accuracy_vs_sparsity", "scores_round_0001", "sparsity_per_layer"]
    status, _, err = cli("inspect", "plot", str(run), "--out", str(tmp_path / "plots"))
    assert status == 2 and "exists; pass --force" in err


def test_report_is_one_self_contained_page(smoke, tmp_path, cli):
    page = tmp_path / "report.html"
    status, out, err = cli("report", str(smoke), "--out", str(page))
    assert status == 0 and out == f"wrote {page}\n", err
    html = page.read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == len(SMOKE_FIGURES)
    for source in sources:
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(source[len(prefix):]))) as image:
            image.verify()
    assert not re.search(r'(src|href)="(?!data:)', html) and "<script" not in html  # nothing to fetch or run
    kept = [f"{int(round_attrs(smoke, i)['kept'])}/{int(round_attrs(smoke, i)['total'])}" for i in (1, 2, 3)]
    assert all(f">{cell}<" in html for cell in kept)
    assert "they select the recorded masks" in html


def test_report_opens_in_headless_chromium_with_its_figures(smoke, tmp_path, cli):
    if not os.access(CHROMIUM, os.X_OK):
        missing("chromium", "apt-get install chromium (tests/run.sh installs it)")
    page = tmp_path / "report.html"
    assert cli("report", str(smoke), "--out", str(page))[0] == 0
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        shown = subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                                "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180)
    assert shown.returncode == 0, shown.stderr[-2000:]
    sizes = re.search(r'<pre id="image-sizes">([^<]*)</pre>', shown.stdout)
    assert sizes is not None, "the page did not finish loading"
    decoded = [tuple(int(side) for side in size.split("x")) for size in sizes.group(1).split()]
    assert len(decoded) == len(SMOKE_FIGURES) and all(width > 0 and height > 0 for width, height in decoded)
    assert "Layers of round 3" in shown.stdout and "<h1>hpcprune run: run.h5</h1>" in shown.stdout
