"""suite.dataset_seeds: a dataset (or a view, through its parent) that runs other seeds than suite.seeds."""
from pathlib import Path

import pytest

from g2d import config as C
from g2d.runs import prepared_dir, train_many
from tests.helpers import tiny_config, write_tiny_cremad


def test_seeds_per_dataset_and_views_fall_back_to_their_parent(tmp_path):
    cfg = tiny_config(tmp_path, ["suite.seeds=[0,1,2,3]", "+suite.dataset_seeds.urfunny=[5]"])
    assert C.suite_seeds(cfg, "cremad") == [0, 1, 2, 3]
    assert C.suite_seeds(cfg, "urfunny") == [5]
    assert C.suite_seeds(cfg, "urfunny-av") == [5]  # a view takes its parent's entry
    cfg = tiny_config(tmp_path, ["+suite.dataset_seeds.urfunny-av=[7]", "+suite.dataset_seeds.urfunny=[5]"])
    assert C.suite_seeds(cfg, "urfunny-av") == [7]  # its own entry wins


@pytest.mark.parametrize("bad,says", [("+suite.dataset_seeds.nope=[1]", "unknown dataset"),
                                      ("+suite.dataset_seeds.cremad=[1,1]", "distinct")])
def test_bad_dataset_seeds_are_one_line_config_errors(tmp_path, bad, says):
    with pytest.raises(C.ConfigError, match=says):
        tiny_config(tmp_path, [bad])


def test_train_many_trains_each_dataset_on_its_own_seeds(tmp_path):
    cfg = tiny_config(tmp_path, ["trainer.epochs=1", "trainer.batch_size=8"])
    write_tiny_cremad(prepared_dir(cfg, "cremad"))
    res = train_many(cfg, [("joint", "cremad", None)], {"cremad": [3, 1]}, tmp_path / "summ")
    assert [r["seed"] for r in res] == [3, 1]
    assert sorted(p.name for p in (Path(cfg.paths.runs) / "joint-cremad").iterdir()) == ["s1", "s3"]
    import json

    summary = json.loads((tmp_path / "summ/joint-cremad.json").read_text())
    assert [s["seed"] for s in summary["seeds"]] == [3, 1]
    assert all("train_time_s" not in s and "git_sha" not in s["provenance"] for s in summary["seeds"])
