"""The determinism matrix: every criterion and rule, bit-identical masks across reruns and world sizes.

tests/test_distributed.py runs its CASES at world size 1 and under mpirun with 2, 3 and 4 ranks and
torchrun with 2, and tests/test_fanout.py compares the SLURM-array and dask backends with them. This
module closes the matrix: it fails when a registered criterion or rule is missing from CASES (so a
new one cannot skip the comparison), and it runs every case a second time to show that a rerun
gives the same masks bit for bit.
"""

from __future__ import annotations

from hpcprune.prune.channels import CHANNEL_CRITERIA, CHANNEL_RULES
from hpcprune.prune.rules import RULES
from hpcprune.prune.scoring import CRITERIA
from tests.helpers import driver, launch
from tests.test_distributed import (  # noqa: F401 (fixture)
    CASES,
    assert_same_masks_of_every_case,
    single_process_masks,
)

MATRIX = {"weight": (CRITERIA, RULES), "channel": (CHANNEL_CRITERIA, CHANNEL_RULES)}


def case_settings(case: str) -> dict[str, str]:
    """The pruning settings of one `name:key=value;key=value` case, defaults filled in."""
    overrides = dict(item.split("=", 1) for item in case.partition(":")[2].split(";") if item)
    return {"granularity": overrides.get("prune.granularity", "weight"),
            "criterion": overrides.get("prune.criterion", "magnitude"), "rule": overrides.get("prune.rule", "global")}


def test_the_matrix_has_every_criterion_and_rule_of_every_granularity():
    settings = [case_settings(case) for case in CASES]
    for granularity, (criteria, rules) in MATRIX.items():
        mine = [s for s in settings if s["granularity"] == granularity]
        assert set(criteria) <= {s["criterion"] for s in mine}, f"{granularity}: criteria without a case"
        assert set(rules) <= {s["rule"] for s in mine}, f"{granularity}: rules without a case"


def test_a_rerun_gives_bit_identical_masks_for_every_case(single_process_masks, tmp_path):  # noqa: F811 (fixture)
    rerun = launch(driver("masks", str(tmp_path), *CASES))
    assert rerun.returncode == 0, rerun.stderr
    assert_same_masks_of_every_case(tmp_path, single_process_masks)
