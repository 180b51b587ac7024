import pytest

from g2d.cli import main
from g2d.config import ConfigError, load_config, trainer_config
from tests.helpers import ROOT, tiny_config, tmp_params


def test_project_params_validate():
    cfg = load_config([], ROOT / "params.yaml")
    assert cfg.method in cfg.methods and cfg.trainer.epochs > 0


def test_override_grammar(tmp_path):
    cfg = tiny_config(tmp_path, ["trainer.epochs=5", "seed=3", "method=unimodal"])
    assert (cfg.trainer.epochs, cfg.seed, cfg.method) == (5, 3, "unimodal")


def test_unknown_key_named(tmp_path):
    with pytest.raises(ConfigError, match="trainer.epochz"):
        load_config(["trainer.epochz=3"], tmp_params(tmp_path))


def test_typo_in_file_named(tmp_path):
    p = tmp_params(tmp_path, lambda d: d["trainer"].update(lrr=0.1))
    with pytest.raises(ConfigError, match="lrr"):
        load_config([], p)


def test_wrong_type_named(tmp_path):
    with pytest.raises(ConfigError, match="trainer.epochs"):
        load_config(["trainer.epochs=abc"], tmp_params(tmp_path))


def test_method_block_validated(tmp_path):
    p = tmp_params(tmp_path, lambda d: d["methods"]["unimodal"].update(modalty="audio"))
    with pytest.raises(ConfigError, match="methods.unimodal"):
        load_config([], p)


def test_unknown_profile(tmp_path):
    with pytest.raises(ConfigError, match="profile 'fast' not in profiles"):
        load_config(["profile=fast"], tmp_params(tmp_path))


def test_profile_overlay_applies(tmp_path):
    cfg = load_config(["profile=paper"], tmp_params(tmp_path))
    assert cfg.data_source == "real" and cfg.trainer.epochs == 300 and cfg.model.resnet.width == 64


def test_dataset_trainer_override(tmp_path):
    p = tmp_params(tmp_path, lambda d: d["datasets"].update(cremad={"trainer": {"epochs": 7}}))
    cfg = load_config([], p)
    assert trainer_config(cfg, "cremad").epochs == 7 and cfg.trainer.epochs != 7


def test_run_in_two_groups_rejected(tmp_path):
    def edit(d):
        d["suite"]["groups"]["ablation"]["methods"].append("joint")

    with pytest.raises(ConfigError, match="joint on cremad is in groups 'main' and 'ablation'"):
        load_config([], tmp_params(tmp_path, edit))


def test_unsupported_task_rejected(tmp_path):
    def edit(d):
        d["suite"]["groups"]["regression"]["methods"].append("agm")

    with pytest.raises(ConfigError, match="agm supports \\['classification'\\], but misme is regression"):
        load_config([], tmp_params(tmp_path, edit))


def test_group_method_needs_block(tmp_path):
    def edit(d):
        d["methods"].pop("umt")

    with pytest.raises(ConfigError, match="has no `methods.umt` block"):
        load_config([], tmp_params(tmp_path, edit))


def test_view_needs_parent_dataset(tmp_path):
    def edit(d):
        d["suite"]["datasets"].remove("urfunny")

    with pytest.raises(ConfigError, match="needs 'urfunny' in suite.datasets"):
        load_config([], tmp_params(tmp_path, edit))


def test_cli_one_line_errors(tmp_path, capsys):
    p = str(tmp_params(tmp_path))
    assert main(["--params", p, "train", "method=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "valid methods" in err and "joint" in err
    assert main(["--params", p, "train", "trainer.nokey=1"]) == 2
    assert "trainer.nokey" in capsys.readouterr().err


def test_per_dataset_method_overrides(tmp_path):
    """`datasets.<d>.methods.<m>` merges over `methods.<m>` for runs on that dataset only (views use their parent's)."""
    from g2d.config import method_params

    def edit(d):
        d["datasets"]["cremad"]["methods"] = {"g2d": {"smp_phase_epochs": [7]}}
        d["datasets"]["urfunny"]["methods"] = {"ogm_ge": {"alpha": 0.3}}

    cfg = tiny_config(tmp_path, edit=edit)
    assert method_params(cfg, "g2d", "cremad").smp_phase_epochs == [7]
    assert method_params(cfg, "g2d", "avmnist").smp_phase_epochs == []
    assert method_params(cfg, "g2d").smp_phase_epochs == []
    assert method_params(cfg, "ogm_ge", "urfunny-av").alpha == 0.3  # a view without its own block
    assert method_params(cfg, "ogm_ge", "urfunny").ge is True  # the rest of methods.ogm_ge is kept
    bad = lambda d: d["datasets"]["cremad"].update(methods={"g2d": {"smp_phasez": [1]}})  # noqa: E731
    with pytest.raises(ConfigError, match=r"methods.g2d \+ datasets.cremad.methods.g2d: invalid key 'smp_phasez'"):
        tiny_config(tmp_path, edit=bad)
    unknown = lambda d: d["datasets"]["cremad"].update(methods={"nope": {}})  # noqa: E731
    with pytest.raises(ConfigError, match=r"datasets.cremad.methods.nope: no `methods.nope` block"):
        tiny_config(tmp_path, edit=unknown)


def test_trainer_select_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.select='best' not in \(best_val, best_test, last\)"):
        tiny_config(tmp_path, ["trainer.select=best"])
