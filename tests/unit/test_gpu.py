"""CUDA checks: the same trainer on a GPU (bf16 autocast, channels-last). Skipped without CUDA."""
from pathlib import Path

import pytest
import torch

from g2d.runs import prepared_dir
from g2d.train.trainer import RunSpec, Trainer
from tests.helpers import tiny_config, write_tiny_cremad

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")]


@pytest.mark.parametrize("amp", [False, True])
def test_trainer_on_cuda(tmp_path, amp):
    cfg = tiny_config(tmp_path, ["trainer.epochs=2", "trainer.batch_size=8", "trainer.device=cuda",
                                 f"trainer.amp={str(amp).lower()}"])
    write_tiny_cremad(prepared_dir(cfg, "cremad"))
    res = Trainer(cfg, RunSpec("joint", "cremad", 0, Path(cfg.paths.runs) / "j/s0",
                               prepared_dir(cfg, "cremad"))).fit()
    assert res["provenance"]["device"] != "cpu"  # the GPU's name is recorded
    assert 0 <= res["selection"]["last"]["test"]["acc"] <= 100


def test_cuda_matches_cpu_without_amp(tmp_path):
    """fp32 on CUDA and on CPU agree to float tolerance after one epoch (same seed, same data)."""
    out = {}
    for dev in ("cpu", "cuda"):
        cfg = tiny_config(tmp_path / dev, ["trainer.epochs=1", "trainer.batch_size=8", f"trainer.device={dev}"])
        write_tiny_cremad(prepared_dir(cfg, "cremad"))
        Trainer(cfg, RunSpec("joint", "cremad", 0, Path(cfg.paths.runs) / "j/s0", prepared_dir(cfg, "cremad"))).fit()
        out[dev] = torch.load(Path(cfg.paths.runs) / "j/s0/model.pt")["model"]
    for k, v in out["cpu"].items():
        if v.is_floating_point():
            torch.testing.assert_close(out["cuda"][k].cpu(), v, rtol=1e-3, atol=1e-4)
