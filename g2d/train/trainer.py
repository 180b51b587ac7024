"""The shared trainer: knows no method. Seeding, optimisation, eval, history, checkpoint/resume."""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from g2d import config as C
from g2d import registry
from g2d.data.prepared import Prepared, atomic_write_text
from g2d.methods.base import Context, Method
from g2d.models.model import MultimodalModel
from g2d.train import checkpoint, metrics
from g2d.train.loader import BatchLoader
from g2d.train.provenance import provenance
from g2d.train.seeding import resolve_device, rng_state, seed_everything, set_rng_state


@dataclass
class RunSpec:
    """One training run: which method on which prepared data, where its outputs go."""

    method: str
    dataset: str
    seed: int
    run_dir: Path
    prepared_dir: Path
    teacher_dir: Path | None = None  # runs folder holding teachers/<dataset>/<modality>/s<seed>/model.pt


def build_optimizer(params, tc: C.TrainerConfig) -> torch.optim.Optimizer:
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    if tc.optimizer == "adam":
        return torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    raise C.ConfigError(f"trainer.optimizer {tc.optimizer!r} not in (sgd, adam, adamw)")


def teacher_path(teacher_dir: Path, dataset: str, modality: str, seed: int) -> Path:
    """Teachers are per base dataset: a view (urfunny-av) uses its parent's (same data, same seed)."""
    base = registry.get_dataset(dataset).view_of or dataset
    return Path(teacher_dir) / "teachers" / base / modality / f"s{seed}" / "model.pt"


def load_teacher(path: Path, spec, mcfg, modality: str, device) -> MultimodalModel:
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher checkpoint {path} not found: train it first "
            f"(`dvc repro teacher@{registry.get_dataset(spec.name).view_of or spec.name}` or "
            f"`g2d teacher {registry.get_dataset(spec.name).view_of or spec.name} --all-seeds`)")
    state = checkpoint.load(path)
    teacher = MultimodalModel(spec, mcfg, (modality,))
    try:
        teacher.load_state_dict(state["model"])
    except RuntimeError as e:
        raise RuntimeError(f"teacher checkpoint {path} does not match the current model config "
                           f"(model.* in params.yaml changed since it was trained?): {str(e)[:300]}") from None
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class Trainer:
    def __init__(self, cfg: C.Schema, run: RunSpec):
        self.cfg = cfg
        self.run = run
        self.tc = C.trainer_config(cfg, run.dataset)
        self.device = resolve_device(self.tc.device)
        if self.tc.num_threads > 0:
            torch.set_num_threads(self.tc.num_threads)
        self.data = Prepared(run.prepared_dir)
        # a dataset view (e.g. urfunny-av) trains on a subset of its parent's modalities
        wanted = registry.get_dataset(run.dataset).spec.modality_names
        full = self.data.spec
        self.spec = dataclasses.replace(full, name=run.dataset,
                                        modalities=tuple(full.modality(m) for m in wanted))
        mcls = registry.get_method(run.method)
        self.method: Method = mcls(C.method_params(cfg, run.method), self.spec)
        self.run_config = {
            "method": run.method, "dataset": run.dataset, "seed": run.seed,
            "trainer": C.to_dict(self.tc), "model": C.to_dict(cfg.model),
            "fusion": getattr(self.method, "fusion", None) or cfg.model.fusion,
            "method_params": C.to_dict(self.method.params), "data": self.data.meta,
        }
        self.fingerprint = C.fingerprint({**self.run_config, "source": provenance(self.device)["source_hash"]})

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict[str, float]:
        model.eval()
        loader = BatchLoader(self.data.split(split), self.tc.eval_batch_size, self.device, task=self.spec.task)
        preds, per, labels = [], {m: [] for m in model.modalities}, []
        for batch in loader:
            with self._ctx.autocast():
                out = model(batch)
            preds.append(self.method.predict(out).float())
            for m in model.modalities:
                per[m].append(out.logits[m].float())
            labels.append(batch["label"])
        y = torch.cat(labels)
        n_cls = self.spec.num_outputs
        res = metrics.compute(self.spec.task, torch.cat(preds), y, n_cls)
        for m in model.modalities:
            for k, v in metrics.compute(self.spec.task, torch.cat(per[m]), y, n_cls).items():
                res[f"{k}_{m}"] = v
        return res

    # ---- training ---------------------------------------------------------------------------
    def fit(self) -> dict:
        run, tc = self.run, self.tc
        run.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(run.seed, tc.deterministic)
        mcfg = self.cfg.model
        if getattr(self.method, "fusion", None):  # fusion plug-in (e.g. g2d+concat)
            mcfg = dataclasses.replace(mcfg, fusion=self.method.fusion)
        model = MultimodalModel(self.spec, mcfg, self.method.modalities()).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        opt = build_optimizer(model.parameters(), tc)
        sched = (torch.optim.lr_scheduler.StepLR(opt, tc.lr_step_epochs, tc.lr_gamma)
                 if tc.lr_step_epochs > 0 else None)
        teachers = {}
        if self.method.needs_teachers:
            tdir = run.teacher_dir or Path(self.cfg.paths.runs)
            for m in model.modalities:
                teachers[m] = load_teacher(teacher_path(tdir, run.dataset, m, run.seed), self.spec,
                                           self.cfg.model, m, self.device)
        self._ctx = ctx = Context(spec=self.spec, device=self.device, epochs=tc.epochs, teachers=teachers,
                                  amp=tc.amp, grad_clip=tc.grad_clip,
                                  check_every=1 if self.device.type == "cpu" else 50, optimizer=opt)
        gen = torch.Generator().manual_seed(run.seed)
        train = BatchLoader(self.data.split("train"), tc.batch_size, self.device, shuffle=True, generator=gen,
                            task=self.spec.task)
        history: list[dict] = []
        start = 0
        ckpt_path = run.run_dir / "ckpt.pt"
        if ckpt_path.is_file():
            state = checkpoint.load(ckpt_path, self.device)
            if state.get("fingerprint") == self.fingerprint:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                if sched is not None:
                    sched.load_state_dict(state["scheduler"])
                self.method.load_state_dict(state["method"])
                set_rng_state(state["rng"])
                gen.set_state(state["loader_rng"])
                history, start = state["history"], state["epoch"] + 1
                ctx.step = state["step"]
                print(f"[g2d] resuming {run.run_dir} from epoch {start}/{tc.epochs}", file=sys.stderr)
            else:
                print(f"[g2d] {ckpt_path} is from another config or code version: starting fresh",
                      file=sys.stderr)
        self.method.setup(model, ctx)
        show = tc.progress == "on" or (tc.progress == "auto" and sys.stderr.isatty())
        bar = tqdm(range(start, tc.epochs), initial=start, total=tc.epochs, disable=not show,
                   desc=f"{run.method}/{run.dataset}/s{run.seed}", leave=False)
        for epoch in bar:
            t0 = time.perf_counter()
            ctx.epoch, ctx.log = epoch, {}
            model.train()
            self.method.on_epoch_start(model, ctx)
            sums: dict[str, torch.Tensor] = {}
            nb = 0
            for batch in train:
                terms = self.method.train_step(model, batch, opt, ctx)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0) + v.float()
                ctx.step += 1
                nb += 1
            row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"]}
            row.update({f"train/{k}": float(v) / max(nb, 1) for k, v in sums.items()})
            if not math.isfinite(row.get("train/loss", 0.0)):
                raise RuntimeError(f"non-finite mean training loss in epoch {epoch}: {row}")
            row.update({f"coef/{k}": float(torch.as_tensor(v).float().mean()) if not torch.is_tensor(v[0])
                        else float(torch.stack(v).mean()) for k, v in ctx.log.items()})
            for split in ("val", "test"):
                row.update({f"{split}/{k}": v for k, v in self.evaluate(model, split).items()})
            row["time_s"] = time.perf_counter() - t0
            history.append(row)
            if sched is not None:
                sched.step()
            name = metrics.primary_metric(self.spec.task)[0]
            bar.set_postfix({f"val_{name}": f"{row[f'val/{name}']:.2f}"})
            last = epoch == tc.epochs - 1
            if not last and tc.checkpoint_every > 0 and (epoch + 1) % tc.checkpoint_every == 0:
                checkpoint.atomic_save({
                    "fingerprint": self.fingerprint, "epoch": epoch, "step": ctx.step,
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "method": self.method.state_dict(), "rng": rng_state(), "loader_rng": gen.get_state(),
                    "history": history}, ckpt_path)
        bar.close()
        return self._finish(model, history, ckpt_path)

    def _finish(self, model, history: list[dict], ckpt_path: Path) -> dict:
        run = self.run
        hist = pd.DataFrame(history)
        hist.insert(0, "seed", run.seed)
        tmp = run.run_dir / ".history.csv.tmp"
        hist.to_csv(tmp, index=False)
        tmp.replace(run.run_dir / "history.csv")
        checkpoint.atomic_save({"model": model.state_dict(), "modalities": list(model.modalities),
                                "fingerprint": self.fingerprint}, run.run_dir / "model.pt")
        result = {
            "run": run.run_dir.parent.name, "method": run.method, "dataset": run.dataset, "seed": run.seed,
            "task": self.spec.task, "primary_metric": metrics.primary_metric(self.spec.task)[0],
            "modalities": list(model.modalities), "source": self.data.meta.get("source", "real"),
            "epochs": len(history), "selection": metrics.select(hist, self.spec.task),
            "params_hash": self.fingerprint, "provenance": provenance(self.device),
            "train_time_s": float(hist["time_s"].sum()),
        }
        atomic_write_text(run.run_dir / "metrics.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
        ckpt_path.unlink(missing_ok=True)
        return result
