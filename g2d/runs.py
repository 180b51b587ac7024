"""Run naming and the per-group driver that trains every seed in one process (one torch import)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from g2d import config as C
from g2d.data.prepared import atomic_write_text


def run_name(method: str, dataset: str, modality: str | None = None) -> str:
    """Group name = DVC stage key: `<method>-<dataset>`, teachers `teachers/<dataset>/<modality>`."""
    return f"teachers/{dataset}/{modality}" if modality else f"{method}-{dataset}"


def summary_name(name: str) -> str:
    return name.replace("teachers/", "teacher-").replace("/", "-")


def base_dataset(dataset: str) -> str:
    """A view (e.g. urfunny-av) reads its parent's prepared data and teachers."""
    from g2d import registry

    return registry.get_dataset(dataset).view_of or dataset


def prepared_dir(cfg: C.Schema, dataset: str) -> Path:
    """Prepared arrays of a dataset (meta.json records whether they are a stand-in or real)."""
    return Path(cfg.paths.prepared) / base_dataset(dataset)


def train_group(cfg: C.Schema, method: str, dataset: str, seeds: list[int], modality: str | None = None,
                summary_dir: Path | None = None, runs_dir: Path | None = None) -> list[dict]:
    """Train `method` on `dataset` for each seed; write the committed summary files of this run group."""
    from g2d.train.trainer import RunSpec, Trainer

    name = run_name(method, dataset, modality)
    results, histories = [], []
    for seed in seeds:
        run_dir = Path(runs_dir or cfg.paths.runs) / name / f"s{seed}"
        trainer = Trainer(cfg, RunSpec(method, dataset, seed, run_dir, prepared_dir(cfg, dataset),
                                       Path(cfg.paths.runs)))
        res = trainer.fit()
        res["run"] = summary_name(name)
        results.append(res)
        histories.append(pd.read_csv(run_dir / "history.csv"))
        sel = res["selection"]["best_val"]
        key = res["primary_metric"]
        print(f"[g2d] {name} seed {seed}: test {key} {sel['test'][key]:.2f} (best-val epoch {sel['epoch']}), "
              f"{res['train_time_s']:.1f}s")
    if summary_dir is not None:
        summary_dir = Path(summary_dir)
        summary_dir.mkdir(parents=True, exist_ok=True)
        name = summary_name(name)
        atomic_write_text(summary_dir / f"{name}.json", json.dumps(
            {"run": name, "method": method, "dataset": dataset, "modality": modality, "seeds": results},
            indent=2, sort_keys=True) + "\n")
        hist = pd.concat(histories, ignore_index=True)
        tmp = summary_dir / f".{name}.csv.tmp"
        hist.to_csv(tmp, index=False, float_format="%.6g")
        tmp.replace(summary_dir / f"{name}.csv")
    return results
