"""Progress bars of `hpcprune prune`: on rank 0 at a terminal, off in logs and when the config says so.

The runs are real, attached to a pseudo-terminal as a person at a shell would be.
"""

from __future__ import annotations

import re

from tests.helpers import run_cli
from tests.inspect_runs import ONESHOT, SMOKE
from tests.terminal import run_in_terminal

BAR = re.compile(r"\|\s*\d+/\d+ \[")  # tqdm's "| 3/3 [" part


def bars(output: str, description: str) -> list[str]:
    """The bar lines (tqdm redraws after each \\r) that start with `description`."""
    return [line for line in re.split(r"[\r\n]+", output) if line.startswith(description) and BAR.search(line)]


def test_a_terminal_shows_selection_training_and_writing_bars(tmp_path):
    status, output = run_in_terminal("prune", "--config", SMOKE, "--out", str(tmp_path / "run.h5"),
                                     "--set", "schedule.rounds=2")
    assert status == 0, output[-2000:]
    for target in ("50.00 %", "75.00 %"):  # the geometric schedule's two targets
        first, second = (bars(output, f"score + select ({target}), pass {n}") for n in (1, 2))
        assert first and second  # the global rule reads every tensor twice
        assert all(re.search(r"\| *\d/3 \[", line) for line in first + second)  # out of LeNet-300's three tensors
    for index in (1, 2):
        assert all(re.search(r"\| *\d/3 \[", line) for line in bars(output, f"round {index}: write") or [""])
        assert bars(output, f"round {index} 1/1")  # the fine-tuning epoch's batches
    assert bars(output, "dense 1/1")


def test_no_bars_when_asked_or_without_a_terminal(tmp_path):
    status, output = run_in_terminal("prune", "--config", ONESHOT, "--out", str(tmp_path / "quiet.h5"),
                                     "--set", "progress=false")
    assert status == 0, output[-2000:]
    assert "archive " in output and not BAR.search(output)
    logged = run_cli("prune", "--config", ONESHOT, "--out", str(tmp_path / "logged.h5"))
    assert logged.returncode == 0 and "round 1/1" in logged.stderr  # [rank 0] log lines only
    assert not BAR.search(logged.stderr) and "\r" not in logged.stderr
    assert all(line.startswith("[rank 0] ") for line in logged.stderr.splitlines())
