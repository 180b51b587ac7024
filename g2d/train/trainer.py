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
from g2d.data.transforms import InputPipeline, resolve_augment
from g2d.methods.base import Context, Method, NonFiniteLoss, task_loss
from g2d.models.model import MultimodalModel
from g2d.codehash import code_id
from g2d.runs import run_lock
from g2d.train import checkpoint, metrics, probes
from g2d.train.checkpoint import CheckpointError
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
    teacher_dir: Path | None = None  # runs folder holding teachers/<dataset>/<modality>/s<seed>/selected.pt
    force: bool = False  # retrain even when run_dir holds a finished run of the same fingerprint


def build_optimizer(params, tc: C.TrainerConfig) -> torch.optim.Optimizer:
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    if tc.optimizer == "adam":
        return torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    raise C.ConfigError(f"trainer.optimizer {tc.optimizer!r} not in (sgd, adam, adamw)")


SELECTED = "selected.pt"  # the weights of the epoch the run reports (trainer.select); teachers distil from it


def teacher_path(teacher_dir: Path, dataset: str, modality: str, seed: int) -> Path:
    """Teachers are per base dataset: a view (urfunny-av) uses its parent's (same data, same seed)."""
    base = registry.get_dataset(dataset).view_of or dataset
    return Path(teacher_dir) / "teachers" / base / modality / f"s{seed}" / SELECTED


def load_teacher(path: Path, spec, mcfg, modality: str, device) -> MultimodalModel:
    """The teacher at its selected epoch (the one its tables report); `.selected` = {rule, epoch}."""
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher checkpoint {path} not found: train it first "
            f"(`dvc repro teacher@{registry.get_dataset(spec.name).view_of or spec.name}` or "
            f"`g2d teacher {registry.get_dataset(spec.name).view_of or spec.name} --all-seeds`)")
    base = registry.get_dataset(spec.name).view_of or spec.name
    try:
        state = checkpoint.load(path)
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise CheckpointError(path, "holds no model state_dict")
    except CheckpointError as e:  # never a silent restart: the student would distil from something else
        raise CheckpointError(path, f"teacher weights {e.why}; retrain the teacher "
                              f"(`dvc repro teacher@{base}` or `g2d teacher {base} --all-seeds --force`)") from None
    teacher = MultimodalModel(spec, mcfg, (modality,))
    try:
        teacher.load_state_dict(state["model"])
    except RuntimeError as e:
        raise RuntimeError(f"teacher checkpoint {path} does not match the current model config "
                           f"(model.* in params.yaml changed since it was trained?): {str(e)[:300]}") from None
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.selected = {"rule": state.get("rule"), "epoch": state.get("epoch"), "path": str(path)}
    return teacher


def _improves(value: float, best: float | None, higher: bool, ties: bool) -> bool:
    """Selection rules of metrics.select: best_val keeps the earliest best (strict), best_test the latest (>=)."""
    if value != value:  # NaN never improves
        return False
    if best is None:
        return True
    if ties:
        return value >= best if higher else value <= best
    return value > best if higher else value < best


def build_model(method: Method, spec, mcfg) -> MultimodalModel:
    """The model a method trains: its fusion plug-in applied, its own modules attached as `model.aux`
    (optimised, checkpointed and moved with the model; see Method.aux_module)."""
    if getattr(method, "fusion", None):  # fusion plug-in (e.g. g2d+concat)
        mcfg = dataclasses.replace(mcfg, fusion=method.fusion)
    model = MultimodalModel(spec, mcfg, method.modalities())
    aux = method.aux_module(model)
    if aux is not None:
        model.aux = aux
    return model


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
        self.method: Method = mcls(C.method_params(cfg, run.method, run.dataset), self.spec)
        base = registry.get_dataset(run.dataset).view_of or run.dataset
        declared = getattr(registry.get_dataset(base), "augment", {}) or {}
        augment = resolve_augment(declared, C.dataset_config(cfg, base).augment, full)
        meta = {**self.data.meta, "modalities": [m for m in self.data.meta["modalities"] if m["name"] in wanted]}
        self.inputs = InputPipeline(meta, augment)
        self.run_config = {
            "method": run.method, "dataset": run.dataset, "seed": run.seed,
            # trainer options that cannot change a result (display, checkpoint spacing: resume is exact) stay out,
            # so a run trained in-process (progress bar) and one from a pool worker (progress off) are the same run
            "trainer": {k: v for k, v in C.to_dict(self.tc).items() if k not in C.RESULT_NEUTRAL_TRAINER},
            "model": C.to_dict(cfg.model),
            "fusion": getattr(self.method, "fusion", None) or cfg.model.fusion,
            "method_params": C.to_dict(self.method.params), "data": self.data.meta,
            "inputs": self.inputs.describe(),
        }
        self._eval_loaders: dict[str, BatchLoader] = {}
        # the code part: the files the method's DVC stage depends on (g2d.codehash), not every g2d file, so the
        # fingerprint (in metrics.json and each checkpoint) is the same in a fresh clone whose report code differs
        self.fingerprint = C.fingerprint({**self.run_config, "source": code_id(run.method),
                                          **({"teachers": self._teacher_ids()} if self.method.needs_teachers else {})})

    def _teacher_ids(self) -> dict[str, str | None]:
        """sha256 of each teacher's selected.pt: a student trained on other teachers is not reused/resumed."""
        tdir = self.run.teacher_dir or Path(self.cfg.paths.runs)
        ids = {}
        for m in self.method.modalities():
            path = teacher_path(tdir, self.run.dataset, m, self.run.seed)
            try:
                ids[m] = checkpoint.recorded_sha256(path) or (checkpoint.file_sha256(path) if path.is_file() else None)
            except (CheckpointError, OSError):
                ids[m] = None  # load_teacher reports it
        return ids

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict[str, float]:
        model.eval()
        loader = self._eval_loaders.get(split)
        if loader is None:  # built once per run: a resident split is copied to the device once, not every epoch
            loader = self._eval_loaders[split] = self._loader(split, self.tc.eval_batch_size)
        preds, per, labels = [], {m: [] for m in model.modalities}, []
        for batch in loader:
            batch = self.inputs.eval(batch)
            with self._ctx.autocast():
                out = self.method.forward(model, batch)
            preds.append(self.method.predict(out).float())
            for m in model.modalities:
                per[m].append(out.logits[m].float())
            labels.append(batch["label"])
        y = torch.cat(labels)
        n_cls = self.spec.num_outputs
        res = metrics.compute(self.spec.task, torch.cat(preds), y, n_cls)
        for m in model.modalities:
            logits = torch.cat(per[m])
            for k, v in metrics.compute(self.spec.task, logits, y, n_cls).items():
                res[f"{k}_{m}"] = v
            res[f"loss_{m}"] = float(task_loss(self.spec, logits, y))  # the head's mean task loss (MSES)
        return res

    # ---- training ---------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train the run while holding its folder's lock (a second trainer on the same folder waits for it,
        then reuses its result). A folder holding a finished run of the same fingerprint (metrics.json
        `params_hash`, with its model.pt and selected.pt intact) is returned as is; `RunSpec.force` retrains."""
        run = self.run
        run.run_dir.mkdir(parents=True, exist_ok=True)
        with run_lock(run.run_dir):
            for name in ("ckpt.pt", "model.pt", SELECTED):  # writes killed between their commit and rename
                try:
                    checkpoint.roll_forward(run.run_dir / name)
                except CheckpointError:
                    pass  # a bad record: reported where the file is read
            checkpoint.clean_stale_tmp(run.run_dir)  # temporaries of writers killed mid-write (kill -9, full disk)
            if run.force:
                print(f"[g2d] {run.run_dir}: --force: retraining from scratch", file=sys.stderr)
                checkpoint.remove(run.run_dir / "ckpt.pt")
            else:
                done = self._completed()
                if done is not None:
                    return done
            (run.run_dir / "metrics.json").unlink(missing_ok=True)  # unfinished until _finish writes it again
            return self._train()

    def _completed(self) -> dict | None:
        """The finished run in run_dir when it is this config's (same fingerprint) and its weights are intact."""
        d = self.run.run_dir
        path = d / "metrics.json"
        if not path.is_file():
            return None
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"[g2d] {path} is unreadable ({type(e).__name__}): retraining", file=sys.stderr)
            return None
        if not isinstance(res, dict) or res.get("params_hash") != self.fingerprint:
            print(f"[g2d] {d}: its finished run is from another config or code version: retraining",
                  file=sys.stderr)
            return None
        try:
            if res.get("diverged"):  # no model.pt; selected.pt only when an epoch completed and was kept
                names = (SELECTED,) if res.get("selected_checkpoint") else ()
            else:
                names = ("model.pt", SELECTED)
            for name in names:
                checkpoint.verify(d / name)
            if not (d / "history.csv").is_file():
                raise CheckpointError(d / "history.csv", "missing")
        except CheckpointError as e:
            print(f"[g2d] {e}: retraining", file=sys.stderr)
            return None
        checkpoint.remove(d / "ckpt.pt")  # left by a kill after metrics.json was written
        print(f"[g2d] {d}: already trained with this config (params_hash {self.fingerprint}): reusing its "
              "metrics.json (--force retrains)", file=sys.stderr)
        return res

    def _resume_state(self, ckpt_path: Path) -> dict | None:
        """The checkpoint to resume from, or None: a missing one; an unreadable, mismatching or unsafe one
        (moved aside to `ckpt.pt.corrupt-<time>`, one stderr line); one of another fingerprint."""
        if not ckpt_path.exists():
            checkpoint.sidecar(ckpt_path).unlink(missing_ok=True)
            return None
        try:
            state = checkpoint.load(ckpt_path, self.device, required=True)
            if not isinstance(state, dict):
                raise CheckpointError(ckpt_path, "is not a checkpoint (no dict inside)")
        except CheckpointError as e:
            aside = checkpoint.move_aside(ckpt_path)
            print(f"[g2d] {e}; moved aside to {aside.name}, starting fresh", file=sys.stderr)
            return None
        if state.get("fingerprint") != self.fingerprint:
            print(f"[g2d] {ckpt_path} is from another config or code version: starting fresh", file=sys.stderr)
            return None
        return state

    def _loader(self, split: str, batch_size: int, **kw) -> BatchLoader:
        """A split's batches under the trainer's residency budget and prefetch setting (see g2d.train.loader)."""
        tc = self.tc
        prefetch = tc.prefetch == "on" or (tc.prefetch == "auto" and self.device.type == "cuda")
        return BatchLoader(self.data.split(split), batch_size, self.device, task=self.spec.task,
                           resident_bytes=int(tc.resident_gib * 1024**3), prefetch=prefetch, **kw)

    def build_training(self) -> Training:
        """Seeded model, optimizer, teachers, context and training batches of a fresh run (what `fit` trains;
        benchmarks/gpu_throughput.py times `train_steps` on it)."""
        run, tc = self.run, self.tc
        seed_everything(run.seed, tc.deterministic)
        model = build_model(self.method, self.spec, self.cfg.model).to(self.device)
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
        self._teachers = {m: t.selected for m, t in teachers.items()}
        if tc.compile:
            for mod in (model, *teachers.values()):
                compile_module(mod)
        check = tc.check_every or (1 if self.device.type == "cpu" else 50)
        self._ctx = ctx = Context(spec=self.spec, device=self.device, epochs=tc.epochs, teachers=teachers,
                                  amp=tc.amp, grad_clip=tc.grad_clip, check_every=check, optimizer=opt)
        gen = torch.Generator().manual_seed(run.seed)
        aug_gen = torch.Generator().manual_seed(augment_seed(run.seed))  # own stream: shuffling is unchanged
        train = self._loader("train", tc.batch_size, shuffle=True, generator=gen, drop_last=tc.drop_last)
        return Training(model, opt, sched, ctx, gen, aug_gen, train)

    def train_steps(self, st: Training, sums: dict[str, torch.Tensor], max_steps: int | None = None) -> int:
        """One pass over the training batches (at most `max_steps`): loss terms summed on the device into `sums`
        (no host sync here; the method's NaN check syncs every trainer.check_every steps). Returns the count."""
        nb = 0
        for batch in st.train:
            batch = self.inputs.train(batch, st.aug_gen)  # teachers and student see the same augmented batch
            terms = self.method.train_step(st.model, batch, st.opt, st.ctx)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.float()
            st.ctx.step += 1
            nb += 1
            if max_steps is not None and nb >= max_steps:
                break
        return nb

    def _train(self) -> dict:
        run, tc = self.run, self.tc
        run.run_dir.mkdir(parents=True, exist_ok=True)
        st = self.build_training()
        model, opt, sched, ctx, gen, aug_gen = st.model, st.opt, st.sched, st.ctx, st.gen, st.aug_gen
        history: list[dict] = []
        start = 0
        ckpt_path = run.run_dir / "ckpt.pt"
        state = self._resume_state(ckpt_path)
        if state is not None:
            try:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                if sched is not None:
                    sched.load_state_dict(state["scheduler"])
                self.method.load_state_dict(state["method"])
                set_rng_state(state["rng"])
                gen.set_state(state["loader_rng"].cpu())  # CPU generators; the file may be mapped to cuda
                aug_gen.set_state(state["augment_rng"].cpu())
                history, start = [dict(r) for r in state["history"]], int(state["epoch"]) + 1
                ctx.step = int(state["step"])
            except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as e:
                aside = checkpoint.move_aside(ckpt_path)  # model/optimizer are half restored: no fallback here
                raise CheckpointError(ckpt_path, f"passed its integrity check but does not restore "
                                      f"({type(e).__name__}: {str(e)[:200]}); moved aside to {aside.name}: "
                                      "rerun to start fresh") from None
            print(f"[g2d] resuming {run.run_dir} from epoch {start}/{tc.epochs}", file=sys.stderr)
        self.method.setup(model, ctx)
        show = tc.progress == "on" or (tc.progress == "auto" and sys.stderr.isatty())
        bar = tqdm(range(start, tc.epochs), initial=start, total=tc.epochs, disable=not show,
                   desc=f"{run.method}/{run.dataset}/s{run.seed}", leave=False)
        diverged = None
        for epoch in bar:
            t0 = time.perf_counter()
            ctx.epoch, ctx.log = epoch, {}
            model.train()
            self.method.on_epoch_start(model, ctx)
            sums: dict[str, torch.Tensor] = {}
            nb = 0
            try:
                nb = self.train_steps(st, sums)
            except NonFiniteLoss as e:  # the NaN guard stops this run, not the stage: recorded as diverged
                diverged = {"epoch": epoch, "step": ctx.step if e.step is None else e.step, "terms": e.terms,
                            "message": str(e)}
                break
            row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"]}
            row.update({f"train/{k}": float(v) / max(nb, 1) for k, v in sums.items()})
            if not math.isfinite(row.get("train/loss", 0.0)):  # a NaN that check_every let through
                diverged = {"epoch": epoch, "step": ctx.step - 1,
                            "terms": {k.removeprefix("train/"): v for k, v in row.items() if k.startswith("train/")},
                            "message": f"non-finite mean training loss in epoch {epoch}"}
                break
            row.update({f"coef/{k}": float(torch.as_tensor(v).float().mean()) if not torch.is_tensor(v[0])
                        else float(torch.stack(v).mean()) for k, v in ctx.log.items()})
            for split in ("val", "test"):
                row.update({f"{split}/{k}": v for k, v in self.evaluate(model, split).items()})
            row["time_s"] = time.perf_counter() - t0
            history.append(row)
            self._keep_selected(model, history)
            if sched is not None:
                sched.step()
            if epoch < tc.epochs - 1:  # between epochs; validation metrics only (Method.on_epoch_end)
                self.method.on_epoch_end(model, ctx, {k.removeprefix("val/"): v for k, v in row.items()
                                                      if k.startswith("val/")})
            name = metrics.primary_metric(self.spec.task)[0]
            bar.set_postfix({f"val_{name}": f"{row[f'val/{name}']:.2f}"})
            last = epoch == tc.epochs - 1
            if not last and tc.checkpoint_every > 0 and (epoch + 1) % tc.checkpoint_every == 0:
                checkpoint.atomic_save({
                    "fingerprint": self.fingerprint, "epoch": epoch, "step": ctx.step,
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "method": self.method.state_dict(), "rng": rng_state(), "loader_rng": gen.get_state(),
                    "augment_rng": aug_gen.get_state(), "history": history}, ckpt_path)
        bar.close()
        if diverged is not None:
            diverged["terms"] = {k: (v if math.isfinite(v) else str(v)) for k, v in diverged["terms"].items()}
            print(f"[g2d] {run.run_dir}: diverged at epoch {diverged['epoch']} step {diverged['step']} "
                  f"({diverged.pop('message')}); recorded as diverged in metrics.json, the stage goes on",
                  file=sys.stderr)
        return self._finish(model, history, ckpt_path, diverged)

    def _keep_selected(self, model, history: list[dict]) -> None:
        """Write `selected.pt` when this epoch is the one `trainer.select` picks so far (same rule as
        metrics.select, so the kept weights are those of the reported epoch)."""
        rule = self.tc.select
        if rule == "last":
            if len(history) == self.tc.epochs:
                self._save_selected(model, history[-1]["epoch"])
            return
        name, higher = metrics.primary_metric(self.spec.task)
        col = f"{'val' if rule == 'best_val' else 'test'}/{name}"
        best = None
        for row in history[:-1]:
            if _improves(row[col], best, higher, ties=False):
                best = row[col]
        if _improves(history[-1][col], best, higher, ties=rule == "best_test"):
            self._save_selected(model, history[-1]["epoch"])

    def _probe(self, model, kept: dict) -> dict:
        """Linear probes of the selected checkpoint's encoders (g2d.train.probes), with its rule and epoch."""
        state = model.state_dict()
        state.update(kept["model"])  # selected.pt holds no method-owned aux modules: keep the model's own
        model.load_state_dict(state)
        loaders = [self._loader(split, self.tc.eval_batch_size) for split in ("train", "test")]
        vals = probes.probe_model(model, *loaders, self.inputs, self.spec.task, self.spec.num_outputs)
        out = {"rule": kept.get("rule"), "epoch": kept["epoch"], "test": vals}
        if self.spec.task == "classification":
            gen = torch.Generator().manual_seed(augment_seed(self.run.seed) ^ 1)  # not the training stream
            out["train"] = probes.train_confidence(model, loaders[0], self.inputs, gen,
                                                   lambda b: self.method.forward(model, b))
        return out

    def _save_selected(self, model, epoch: int) -> None:
        checkpoint.atomic_save({"model": _model_state(model), "modalities": list(model.modalities), "epoch": epoch,
                                "rule": self.tc.select, "fingerprint": self.fingerprint},
                               self.run.run_dir / SELECTED)

    def _finish(self, model, history: list[dict], ckpt_path: Path, diverged: dict | None = None) -> dict:
        """Write the finished run: history.csv, model.pt, metrics.json (last: it marks the run finished).

        A diverged run (`diverged` = {epoch, step, terms}: a non-finite loss stopped it) is finished too: its
        metrics.json records `diverged`, the history and the selection over the epochs that completed
        before the divergence (`selection` is null when none did), and `selected_checkpoint` the kept weights
        of the selected epoch (null when there are none, e.g. trainer.select=last). It writes no model.pt
        (the last weights are not finite). Reruns reuse it like any finished run (`RunSpec.force` retrains);
        the aggregator counts it as diverged and leaves it out of the means."""
        run = self.run
        hist = pd.DataFrame(history)
        hist.insert(0, "seed", run.seed)
        (run.run_dir / ".history.csv.tmp").unlink(missing_ok=True)  # fixed temp name of older versions
        atomic_write_text(run.run_dir / "history.csv", hist.to_csv(index=False))
        if diverged is None:
            checkpoint.atomic_save({"model": _model_state(model), "modalities": list(model.modalities),
                                    "fingerprint": self.fingerprint}, run.run_dir / "model.pt")
        else:
            checkpoint.remove(run.run_dir / "model.pt")  # an older run's weights must not pass for this one's
        selection = metrics.select(hist, self.spec.task) if history else None
        kept = checkpoint.load(run.run_dir / SELECTED) if (run.run_dir / SELECTED).exists() else {}
        want = selection[self.tc.select]["epoch"] if selection else None
        if diverged is None and (kept.get("fingerprint") != self.fingerprint or kept["epoch"] != want):
            raise RuntimeError(f"{run.run_dir / SELECTED}: holds epoch {kept.get('epoch')}, but trainer.select="
                               f"{self.tc.select} picks epoch {want}; delete the run folder and retrain")
        kept_ok = bool(kept) and kept.get("fingerprint") == self.fingerprint and kept.get("epoch") == want
        if diverged is not None and not kept_ok:
            checkpoint.remove(run.run_dir / SELECTED)  # another run's, or an epoch this run does not report
        probed = self._probe(model, kept) if diverged is None and kept_ok else None
        result = {
            "run": run.run_dir.parent.name, "method": run.method, "dataset": run.dataset, "seed": run.seed,
            "task": self.spec.task, "primary_metric": metrics.primary_metric(self.spec.task)[0],
            "modalities": list(model.modalities), "source": self.data.meta.get("source", "real"),
            "epochs": len(history), "selection": selection,
            "selected_checkpoint": ({"rule": self.tc.select, "epoch": kept["epoch"], "file": SELECTED}
                                    if kept_ok else None),
            "teachers": self._teachers, "split": self.data.meta.get("split_variant", "standard"),
            "diagnostics": probed,  # linear probes (test) and train-batch confidence (train) of selected.pt
            "inputs": self.inputs.describe(),
            "params_hash": self.fingerprint, "provenance": provenance(self.device),
            "train_time_s": float(hist["time_s"].sum()) if history else 0.0,
        }
        if diverged is not None:
            result["diverged"] = diverged
        atomic_write_text(run.run_dir / "metrics.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
        checkpoint.remove(ckpt_path)
        return result


@dataclass
class Training:
    """What one run trains with (Trainer.build_training)."""

    model: MultimodalModel
    opt: torch.optim.Optimizer
    sched: object
    ctx: Context
    gen: torch.Generator
    aug_gen: torch.Generator
    train: BatchLoader


def compile_module(module: torch.nn.Module) -> bool:
    """trainer.compile: `module.compile()` in place (state_dict keys unchanged, so checkpoints are the same files);
    where torch.compile is unavailable or fails, one stderr line and the module stays eager. Errors that surface
    only at the first compiled call fall back to eager too (torch._dynamo suppress_errors)."""
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
        module.compile()
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: train eagerly
        print(f"[g2d] warning: trainer.compile: torch.compile failed ({type(e).__name__}: {str(e)[:120]}); "
              "training eagerly", file=sys.stderr)
        return False


def augment_seed(seed: int) -> int:
    """Seed of a run's augmentation stream: derived from the run seed, distinct from the loader's."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"augment/{seed}".encode()).digest()[:8], "little") >> 1


def _model_state(model) -> dict:
    """Model weights without method-owned auxiliary modules (those live in the training checkpoint)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("aux.")}
