"""The README's "adding a method" walkthrough: one file + params entries, `dvc repro`, then `g2d compare`."""
from __future__ import annotations

import shutil
import sys

import pandas as pd
import yaml

from tests.pipeline_project import run

TOY = '''"""A toy method for the walkthrough: Joint-Train plus an auxiliary unimodal loss per modality."""
from dataclasses import dataclass

from g2d.methods.base import Method, task_loss
from g2d.registry import register_method


@dataclass
class ToyParams:
    weight: float = 0.5


@register_method("toy")
class Toy(Method):
    Params = ToyParams

    def loss(self, batch, out, ctx):
        terms = {"task": task_loss(self.spec, out.fused, batch["label"])}
        for m, logits in out.logits.items():
            terms[f"uni_{m}"] = self.params.weight * task_loss(self.spec, logits, batch["label"])
        return terms
'''


def test_new_method_appears_beside_the_suite(ci_project, tmp_path):
    proj = tmp_path / "proj"
    shutil.copytree(ci_project, proj, symlinks=True)
    (proj / "baselines/toy.py").write_text(TOY)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["methods"]["toy"] = {}
    params["suite"]["groups"]["main"]["methods"].append("toy")
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([sys.executable, "-m", "dvc", "repro"], proj).stdout
    assert "Running stage 'main@toy'" in out
    assert "Running stage 'main@joint'" not in out and "Running stage 'teacher@" not in out  # nothing else re-ran
    md = (proj / "reports/cremad.md").read_text()
    assert "| toy |" in md and "| joint |" in md and "| g2d |" in md
    run(["g2d", "compare", "toy"], proj)
    cmp = pd.read_csv(proj / "reports/compare/toy.csv")
    seeds = len(params["suite"]["seeds"])
    assert set(cmp.vs) == {"joint", "g2d"} and (cmp.n == seeds).all()
    assert "toy against the suite" in (proj / "reports/compare/toy.md").read_text()
