"""Slow: the stand-ins show the published imbalance under Joint-Train (what the suite's tables rely on).

Runs teachers + Joint-Train through the normal Trainer for every stand-in (3 seeds, ~1-4 min on
one CPU thread) and asserts the dominant/weak ordering of `g2d.calibrate.imbalance_checks`.
"""
from __future__ import annotations

import pytest

from g2d import registry
from g2d.calibrate import DATASETS, BASE_OVERRIDES, calibrate_dataset, imbalance_checks, summarise


KNOWN_GAPS = {
    "vggsound": "VGGSound stand-in not calibrated within the embedded budget: both Joint-Train heads collapse "
                "(reports/calibration.md, NOTES['vggsound'])",
    "urfunny": "under the LR step + last-epoch recipe the UR-Funny audio head keeps more than half of its "
               "teacher's margin (reports/calibration.md, NOTES['urfunny'])",
}
CASES = [pytest.param(d, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[d])) if d in KNOWN_GAPS else d
         for d in DATASETS]


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_joint_train_shows_the_imbalance(tmp_path, name):
    res = calibrate_dataset(name, [0, 1, 2], BASE_OVERRIDES, work=tmp_path, verbose=False)
    table = summarise(res)
    checks = imbalance_checks(table, name)
    assert checks and all(checks.values()), (checks, table[["role", "modality", "mean", "values"]].to_dict("records"))
    # a teacher for every modality, Joint-Train heads for every modality + fused, figures in range
    spec = registry.get_dataset(name).spec
    assert set(table[table.role == "teacher"].modality) == set(spec.modality_names)
    assert set(table[table.role == "joint"].modality) == {"fused", *spec.modality_names}
    assert (table["n_seeds"] == 3).all() and table["mean"].between(-1.0, 100.0).all()
    assert (table["std"] >= 0).all()
