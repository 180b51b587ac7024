"""The paper profile's recipes (issue 10): every value has a source, no source is stale, the profile
validates and is applied as written, and reports/recipes.md shows each value and source in a table cell."""
from __future__ import annotations

import math
import re

import pytest
import yaml

from g2d import registry
from g2d.config import load_config, method_params
from g2d.report import recipes
from tests.helpers import ROOT

PARAMS = ROOT / "params.yaml"


def _flatten(tree, prefix=""):
    """Dotted key -> leaf (scalars, lists, empty mappings), written independently of recipes.leaves."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


@pytest.fixture(scope="module")
def profile():
    return yaml.safe_load(PARAMS.read_text())["profiles"]["paper"]


@pytest.fixture(scope="module")
def values(profile):
    return _flatten({k: v for k, v in profile.items() if k != "sources"})


@pytest.fixture(scope="module")
def paper():
    return load_config(["profile=paper"], PARAMS)


@pytest.fixture(scope="module")
def defaults():
    return load_config(["profile=embedded"], PARAMS)


@pytest.fixture(scope="module")
def rendered(paper, defaults):
    return recipes.render(paper, defaults)


def test_every_paper_value_has_a_source(profile, values):  # (a)
    sources = profile.get("sources") or {}
    missing = [k for k in values if not str(sources.get(k) or "").strip()]
    assert not missing, f"profiles.paper values without a source in profiles.paper.sources: {missing}"
    assert len(values) > 50  # the recipe really is spelled out (trainer, model, methods, every dataset)


def test_no_stale_sources(profile, values):  # (b)
    stale = [k for k in profile.get("sources") or {} if k not in values]
    assert not stale, f"profiles.paper.sources names no value of the profile: {stale}"


def test_every_source_has_an_accepted_form(profile):
    bad = {k: s for k, s in profile["sources"].items() if not recipes.source_forms(str(s))}
    assert not bad, f"sources of none of the forms {list(recipes.SOURCE_FORMS)}: {bad}"
    for s in profile["sources"].values():  # a repository citation is owner/repo:path@commit, commit in hex
        for m in re.finditer(r"\b[\w.-]+/[\w.-]+:[\w./+-]+@(\w+)", s):
            assert re.fullmatch(r"[0-9a-f]{7,40}", m.group(1)), (m.group(0), s)


def test_source_checker_flags_missing_stale_and_formless():
    prof = {"trainer": {"lr": 0.1, "epochs": 3}, "sources": {
        "trainer.lr": "owner/repo:train.py@abc1234 (lr = 0.1)", "trainer.momentum": "not published: our choice, because x"}}
    errs = recipes.check_sources(prof)
    assert any(e.startswith("trainer.epochs: no source") for e in errs)
    assert any(e.startswith("sources.trainer.momentum:") and "stale" in e for e in errs)
    assert len(errs) == 2
    prof["sources"] = {"trainer.lr": "G2D paper, Table 2", "trainer.epochs": "because I said so"}
    assert [e.split(":")[0] for e in recipes.check_sources(prof)] == ["sources.trainer.epochs"]


def test_paper_profile_validates_and_is_applied_as_written(paper, values):  # (c)
    assert paper.profile == "paper" and paper.trainer.select == "best_test" and paper.data_source == "real"
    for key, want in values.items():
        got = recipes.lookup(paper, key)
        assert got is not recipes.MISSING, key
        assert recipes._same(got, want), (key, got, want)


def test_every_suite_run_builds_under_the_paper_profile(paper):
    """Each (method, dataset) of the suite gets valid params, its method object builds on the dataset's
    modalities, and SMP methods get phase lengths that fit the dataset's modality count."""
    from g2d.config import trainer_config
    from g2d.methods.smp import phase_bounds

    seen = 0
    for group in paper.suite.groups.values():
        for ds in group.datasets:
            spec = registry.get_dataset(ds).spec
            for m in group.methods:
                params = method_params(paper, m, ds)
                registry.get_method(m)(params, spec)
                if hasattr(params, "smp_phase_epochs"):
                    bounds = phase_bounds(params, len(spec.modality_names), trainer_config(paper, ds).epochs)
                    assert bounds[-1] == 150, (m, ds, bounds)  # 150 prioritised epochs, also for k = 3
                seen += 1
    assert seen > 60
    assert method_params(paper, "ogm_ge", "cremad").alpha == 1.0
    assert method_params(paper, "ogm_ge", "cremad").end_epoch == 150
    assert method_params(paper, "agm", "avmnist").cap == math.inf
    assert method_params(paper, "g2d", "iemocap").smp_phase_epochs == [75, 75]


def _tables(md: str) -> dict[str, list[str]]:
    """First cell (backticks stripped) -> the row's cells, for every table row of the page."""
    rows = {}
    for line in md.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip().replace(r"\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        key = cells[0].strip("`")
        assert key not in rows, f"{key} is in two rows"
        rows[key] = cells
    return rows


def test_rendered_recipes_show_each_value_and_source(rendered, profile, values):  # (d)
    rows = _tables(rendered)
    assert set(rows) == set(values)
    for key, want in values.items():
        setting, value, _, source = rows[key]
        got = yaml.safe_load(value.strip("`"))
        assert recipes._same(got, want), (key, value, want)
        assert source == profile["sources"][key], key
    assert "Missing or stale sources" not in rendered
    # the default column says which values the profile changes
    assert rows["trainer.epochs"][2] == "changed from `20`"
    assert rows["trainer.optimizer"][2] == "same"
    assert rows["datasets.cremad.augment.visual.recipe"][2] == "changed from `crop_keep_flip`"
    assert rows["methods.ogm_ge.end_epoch"][2] == "changed from `50`"


def test_rendered_recipes_sections_and_runs(rendered, paper):
    for ds in paper.suite.datasets:
        assert f"(`{ds}`)" in rendered, ds
        section = rendered.split(f"(`{ds}`)")[1].split("\n## ")[0]
        assert f"| `datasets.{ds}." in section  # each dataset states at least its augmentation
    cremad = rendered.split("(`cremad`)")[1].split("\n## ")[0]
    assert "| ogm_ge | cremad | alpha=1.0, end_epoch=150 |" in cremad
    assert "| g2d | cremad | smp_phase_epochs=[150], smp_scope=official; SMP phases tau = [150] epochs |" in cremad
    urfunny = rendered.split("(`urfunny`)")[1].split("\n## ")[0]
    assert "| g2d | urfunny | smp_scope=official; SMP phases tau = [75, 75] epochs |" in urfunny
    assert "| g2d | urfunny-av | smp_scope=official; SMP phases tau = [150] epochs |" in urfunny


def test_fmt_value_round_trips_through_yaml():
    for v in (0.001, 1e-05, 1e20, 1.3333333333333333, math.inf, 300, True, "rrc_flip", [0.08, 1.0], [], None,
              {"audio": 0.55, "visual": 0.45}):
        assert recipes._same(yaml.safe_load(recipes.fmt_value(v)), v), v


def test_write_recipes_from_an_embedded_config(tmp_path, paper, defaults):
    from tests.helpers import tmp_params

    cfg = load_config([], tmp_params(tmp_path))  # what `g2d report` gets: the embedded profile
    (path,) = recipes.write_recipes(cfg, tmp_path / "reports")
    assert path == tmp_path / "reports" / "recipes.md"
    assert path.read_text() == recipes.render(paper, defaults)
    no_paper = load_config([], tmp_params(tmp_path, lambda d: d["profiles"].pop("paper")))
    assert recipes.write_recipes(no_paper, tmp_path / "other") == []
