import pytest
import torch

from g2d.models.fusion import FUSIONS
from g2d.models.model import MultimodalModel
from tests.conftest import make_batch, tiny_model_cfg, tiny_spec


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("k", [2, 3])
def test_output_shapes(fusion, k):
    spec = tiny_spec(k)
    model = MultimodalModel(spec, tiny_model_cfg(fusion))
    out = model(make_batch(spec, 5))
    assert out.fused.shape == (5, spec.num_outputs)
    assert set(out.logits) == set(out.features) == set(spec.modality_names)
    for m in spec.modality_names:
        assert out.logits[m].shape == (5, spec.num_outputs)
        assert out.features[m].shape == (5, model.encoders[m].out_dim)


def test_late_fusion_is_mean_of_heads():
    spec = tiny_spec(3)
    out = MultimodalModel(spec, tiny_model_cfg("late"))(make_batch(spec))
    torch.testing.assert_close(out.fused, torch.stack(list(out.logits.values())).mean(0))


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_additive_shares_sum_to_fused(fusion):
    spec = tiny_spec(2)
    out = MultimodalModel(spec, tiny_model_cfg(fusion))(make_batch(spec))
    torch.testing.assert_close(out.fused, sum(out.logits.values()))


def test_drop_zero_fills_inputs():
    spec = tiny_spec(2)
    model = MultimodalModel(spec, tiny_model_cfg()).eval()
    batch = make_batch(spec)
    seen = {}
    model.encoders["audio"].register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))
    dropped = model(batch, drop=("audio",))
    assert torch.count_nonzero(seen["x"]) == 0
    zeros = dict(batch, audio=torch.zeros_like(batch["audio"]))
    torch.testing.assert_close(dropped.fused, model(zeros).fused)
    model(batch)
    assert torch.equal(seen["x"], batch["audio"])
    with pytest.raises(KeyError, match="unknown modalities"):
        model(batch, drop=("smell",))


def test_modality_parameters_partition_encoders():
    spec = tiny_spec(3)
    model = MultimodalModel(spec, tiny_model_cfg())
    groups = model.modality_parameters()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    enc = {id(p) for p in model.encoders.parameters()}
    assert set(ids) == enc
    for m, ps in groups.items():
        assert {id(p) for p in model.encoders[m].parameters()} == {id(p) for p in ps}


def test_unimodal_model_has_one_encoder():
    spec = tiny_spec(2)
    model = MultimodalModel(spec, tiny_model_cfg("concat"), ("visual",))
    out = model(make_batch(spec))
    assert list(out.logits) == ["visual"]
    torch.testing.assert_close(out.fused, out.logits["visual"])


def test_fusion_plugin_changes_the_trained_head(tmp_path):
    from pathlib import Path

    from g2d import registry
    from g2d.models.fusion import ConcatFusion
    from g2d.runs import prepared_dir
    from g2d.train.trainer import RunSpec, Trainer
    from tests.helpers import tiny_config, write_tiny_cremad

    assert registry.get_method("joint+concat").fusion == "concat"
    cfg = tiny_config(tmp_path, ["trainer.epochs=1"])
    write_tiny_cremad(prepared_dir(cfg, "cremad"))
    seen = {}
    orig = Trainer._finish
    Trainer._finish = lambda self, model, *a: seen.update(m=model) or orig(self, model, *a)
    try:
        Trainer(cfg, RunSpec("joint+concat", "cremad", 0, Path(cfg.paths.runs) / "x/s0",
                             prepared_dir(cfg, "cremad"))).fit()
    finally:
        Trainer._finish = orig
    assert isinstance(seen["m"].fusion, ConcatFusion)


@pytest.mark.parametrize("fusion", ["film", "late", "concat", "sum", "gated"])
def test_logits_grow_at_most_linearly_with_the_feature_scale(fusion):
    """Issue 16 (g2d+film diverged): scaling every encoder feature by s scales no fused or per-modality logit by
    more than O(s). The official FiLM, gamma(c) * x + beta with gamma linear in c, grows as s^2 (its
    self-conditioned read-out gamma(x) * x), which is what let features and gradients run away."""
    from g2d.models.fusion import build_fusion

    torch.manual_seed(0)
    dims = {"audio": 16, "visual": 16}
    head = build_fusion(fusion, dims, 6, 32)
    feats = {m: torch.randn(8, d) for m, d in dims.items()}
    s = 1e4
    fused1, per1 = head(feats)
    fused2, per2 = head({m: s * f for m, f in feats.items()})
    for a, b in [(fused1, fused2), *((per1[m], per2[m]) for m in dims)]:
        assert b.abs().max() <= 4 * s * max(a.abs().max().item(), 1.0)
