"""Calibrate the embedded stand-ins, method-agnostically (targets, checks, knob search).

`g2d calibrate` (the `calibrate` DVC stage) writes reports/calibration.md from the suite's own teacher and
Joint-Train runs (g2d/report/calibration.py: targets, Bayes ceilings, the teachers' train-batch confidence
with and without augmentation, power per claim). No imbalance method is ever used to judge a stand-in.

`g2d calibrate --train` is the knob search: for each dataset it generates the stand-in, trains every unimodal
teacher and Joint-Train for each seed through the normal Trainer, and compares test figures with the published
teacher / Joint-Train numbers, writing data/calibration/calibration.md (Hydra overrides for experiments):

    g2d calibrate --train [--datasets cremad ...] [--seeds 0 1 2] [--work data/calibration] [key=value ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from g2d import config as C
from g2d import registry

DATASETS = ("cremad", "avmnist", "vggsound", "urfunny", "iemocap", "misme")

# Published figures (test %, official test-max protocol) and the imbalance each stand-in must show.
# dominant: the modality whose Joint-Train head stays near its teacher; weak: heads collapsed below
# their teachers. Sources: reference/g2d-spec.md §4, §8; reference/datasets-and-suites.md §2.
TARGETS: dict[str, dict] = {
    "cremad": {"teacher": {"audio": 61.7, "visual": 76.5}, "joint": {"fused": 67.5, "audio": 60.0, "visual": 27.4},
               "dominant": "audio", "weak": ["visual"],
               "source": "G2D Fig. 1 and rAIson-Lab/G2D config.py teacher checkpoints"},
    "avmnist": {"teacher": {"audio": 42.7, "image": 65.6}, "joint": {"fused": 69.8},
                "dominant": "image", "weak": ["audio"],
                "source": "G2D config.py teachers; G2D Table (Joint-Train 69.77). Per-head figures unpublished: "
                          "the image (better and faster) is taken as dominant"},
    "vggsound": {"teacher": {"audio": 43.4, "visual": 32.3}, "joint": {"fused": 51.0},
                 "dominant": "audio", "weak": ["visual"],
                 "source": "G2D config.py teachers; G2D Table (Joint-Train 50.97); audio dominance as in OGM-GE"},
    "urfunny": {"teacher": {}, "joint": {"fused": 62.6},
                "dominant": "text", "weak": ["audio", "visual"],
                "source": "G2D UR-Funny table (A+V+TXT Joint-Train 62.58); unimodal figures unpublished: "
                          "text taken as the dominant modality"},
    "iemocap": {"teacher": {}, "joint": {},
                "dominant": "text", "weak": ["audio", "visual"],
                "source": "no numbers published for G2D's IEMOCAP setup (g2d-spec.md §8.4); qualitative: text "
                          "strongest, then audio, visual weakest, as usual for CMU-SDK-style features"},
    "misme": {"teacher": {}, "joint": {},
              "dominant": "weather", "weak": ["image"],
              "source": "no G2D numbers (g2d-spec.md §8.4). MIS-ME abstract (Rakib et al. 2024, from memory, "
                        "unverified): image-only MAPE ~12.3% beats weather-only ~13.4%, fused 10.14%; the "
                        "tabular weather branch learns fastest, so it is taken as dominant under joint training"},
}


# The embedded model/trainer values the stand-ins were calibrated with (proposed for params.yaml;
# once params.yaml carries them these overrides are no-ops). `++datasets.<d>.split_seed=0` only makes
# sure each dataset block exists.
# calibration runs exactly the committed params.yaml (the embedded trainer/model settings live there)
BASE_OVERRIDES = ["trainer.progress=off"]


# Known gaps, rendered under each dataset's table (kept here so the report never hides them).
NOTES: dict[str, str] = {
    "cremad": "The visual frames train under `crop_keep_flip` (the official box and flip without the resize), the "
              "audio spectrograms un-augmented, as in the official pipeline; that alone puts the visual teacher's "
              "train-batch confidence below the audio teacher's, which is what makes SMP train visual first (the "
              "order the paper describes). Known gap: the audio teacher sits at its Bayes ceiling (flip 0.1 and "
              "pair-blind codes cap it near 62 % and rho_audio near 0.64), so unlike the real 300-epoch audio "
              "teacher it cannot memorise its training set; the ordering comes from the augmentation side only.",
    "avmnist": "Teachers on target; fused ~3 below 69.8.",
    "vggsound": "NOT calibrated within the embedded budget, and run with 3 seeds only (suite.dataset_seeds: each "
                "run costs ~6x a CREMA-D run): 309 classes at ~4 training samples per class and 16-d features leave "
                "both teachers under-trained after 20 epochs, and under Joint-Train both heads collapse, so the "
                "audio-dominant pattern is not reproduced. Treat VGGSound stand-in tables and claims rows as smoke "
                "tests of the 309-class path; a reduced-class stand-in would be the next step.",
    "urfunny": "Unimodal targets unpublished: text made the strongest and fastest (assumption). Under the LR step "
               "and last-epoch selection of the 10-seed suite the audio head no longer collapses (it keeps more "
               "than half of its teacher's margin over chance), so only the visual head shows the weak-modality "
               "pattern; not recalibrated in this round.",
    "iemocap": "No published targets for G2D's setup: qualitative ordering text > audio > visual.",
    "misme": "Regression (R^2). Per-head R^2 under late (mean) fusion is not comparable with a teacher: each head "
             "learns about twice its share of the fused output, so a head that learned its best predictor "
             "scores R^2 ~ 0 alone. The per-head rows are shown but not used in the checks.",
}


# Measured alternatives and cross-cutting findings (rendered at the end of the report).
FINDINGS = [
    "Model width: at `model.resnet.width=16` (32-d features) the CREMA-D / AV-MNIST teachers and Joint-Train "
    "fused land closer to the targets (CREMA-D 61.7 / 76.0 / 69.6; AV-MNIST 47.2 / 70.3 / 71.5, 3 seeds) and "
    "the VGGSound visual teacher reaches 27.8, but the weak heads collapse less (CREMA-D visual head 49.9, "
    "AV-MNIST audio head 31.9, both failing the <= 50% margin check) and runs cost ~40% more CPU; width 8 kept.",
    "The mechanism that reproduces the Figure-1 collapse: the dominant modality is a clean, high-SNR linear "
    "code that knows the coarse class groups; the weak one carries all classes, but its group code is an "
    "interaction (xor, slow) or low-SNR, and its within-pair bits are weak. Under Joint-Train the fast "
    "modality takes the group-level loss away before the slow one learns it, so the weak head ends up "
    "knowing little beyond the residual. Making the weak modality faster (higher amplitude, less noise) "
    "raises its teacher and weakens the collapse together: teacher accuracy and collapse trade off.",
    "Selection noise: 10% of 480 = 48 validation samples, so the best-validation epoch is noisy; "
    "seed-to-seed std of 1-8 points is mostly selection noise.",
]


def _metric(task: str) -> str:
    return "acc" if task == "classification" else "r2"


def calibrate_dataset(name: str, seeds: list[int], overrides: list[str] = (), params: str = "params.yaml",
                      work: Path = Path("data/calibration"), standin: dict | None = None,
                      verbose: bool = True) -> dict:
    """Teachers + Joint-Train on the stand-in of `name`; per-run test figures (trainer.select) and cost."""
    from g2d.runs import prepared_dir, train_group

    cfg = C.load_config([*overrides, f"dataset={name}", "method=joint"], params)
    cfg.paths.prepared = str(Path(work) / "prepared")
    cfg.paths.runs = str(Path(work) / "runs")
    if standin:
        cfg.datasets = {**cfg.datasets, name: {**(cfg.datasets.get(name) or {}), "standin": standin}}
    ds = registry.get_dataset(name)(C.dataset_config(cfg, name))
    if ds.view_of:
        raise ValueError(f"{name} is a view of {ds.view_of}: calibrate {ds.view_of}")
    t0 = time.perf_counter()
    ds.standin(prepared_dir(cfg, name), seed=cfg.seed)
    gen_s = time.perf_counter() - t0
    metric = _metric(ds.spec.task)
    rows, cost = [], {}
    groups = [(m, "unimodal") for m in ds.spec.modality_names] + [(None, "joint")]
    for modality, method in groups:
        methods = {**cfg.methods, "unimodal": {"modality": modality or ""}}
        mcfg = dataclasses.replace(cfg, method=method, methods=methods)
        t0 = time.perf_counter()
        results = train_group(mcfg, method, name, list(seeds), modality) if verbose else _quiet(
            train_group, mcfg, method, name, list(seeds), modality)
        cost.setdefault("teacher" if modality else "joint", []).append((time.perf_counter() - t0) / len(seeds))
        for res in results:
            test = res["selection"][cfg.trainer.select]["test"]
            if modality:
                rows.append({"role": "teacher", "modality": modality, "seed": res["seed"], "value": test[metric]})
            else:
                rows.append({"role": "joint", "modality": "fused", "seed": res["seed"], "value": test[metric]})
                for m in ds.spec.modality_names:
                    rows.append({"role": "joint", "modality": m, "seed": res["seed"], "value": test[f"{metric}_{m}"]})
    cost = {k: float(np.mean(v)) for k, v in cost.items()}  # wall seconds per run, teachers averaged
    return {"dataset": name, "metric": metric, "rows": rows, "sec_per_run": cost, "generate_s": gen_s,
            "standin": dataclasses.asdict(ds.config.standin), "trainer": C.to_dict(C.trainer_config(cfg, name)),
            "model": C.to_dict(cfg.model), "overrides": list(overrides)}


def _quiet(fn, *a):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a)


def summarise(result: dict) -> pd.DataFrame:
    """One row per (role, modality): mean, std over seeds, target, and the imbalance roles."""
    name = result["dataset"]
    tgt = TARGETS.get(name, {})
    df = pd.DataFrame(result["rows"])
    out = []
    for (role, mod), g in df.groupby(["role", "modality"], sort=False):
        v = g.sort_values("seed")["value"].to_numpy(dtype=float)
        out.append({"dataset": name, "role": role, "modality": mod, "metric": result["metric"],
                    "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                    "n_seeds": len(v), "values": " ".join(f"{x:.2f}" for x in v),
                    "target": tgt.get(role, {}).get(mod, float("nan")),
                    "sec_per_run": result["sec_per_run"][role],
                    "standin": json.dumps(result["standin"], sort_keys=True),
                    "trainer": json.dumps(result["trainer"], sort_keys=True),
                    "model": json.dumps(result["model"], sort_keys=True)})
    return pd.DataFrame(out)


def imbalance_checks(table: pd.DataFrame, name: str) -> dict[str, bool]:
    """The property the suite's tables rely on, in accuracy above chance: under Joint-Train the
    dominant head keeps >= 75% of its teacher's margin over chance; every weak head keeps <= 50%.

    Regression (MIS-ME): per-head R^2 under mean (late) fusion is not comparable with a teacher (each
    head learns about twice its share of the fused output), so only the qualitative teacher ordering
    (image better alone) and a fused R^2 at least as good as the best teacher are checked.
    """
    t = TARGETS[name]
    rows = table[table.dataset == name]
    sub = rows.set_index(["role", "modality"])["mean"]
    if rows["metric"].iloc[0] == "r2":
        weak, dom = t["weak"][0], t["dominant"]
        best = max(sub[("teacher", weak)], sub[("teacher", dom)])
        return {f"{weak} teacher better than {dom} teacher": bool(sub[("teacher", weak)] > sub[("teacher", dom)]),
                "Joint-Train fused >= best teacher - 0.05": bool(sub[("joint", "fused")] >= best - 0.05)}
    chance = 100.0 / len(registry.get_dataset(name).spec.classes)
    dom = t["dominant"]

    def margin(role: str, m: str) -> float:
        return sub[(role, m)] - chance

    checks = {f"{dom} head keeps >= 75% of its teacher's margin over chance":
              bool(margin("joint", dom) >= 0.75 * margin("teacher", dom))}
    for w in t["weak"]:
        checks[f"{w} head keeps <= 50% of its teacher's margin over chance"] = bool(
            margin("joint", w) <= 0.5 * margin("teacher", w))
    return checks


def _summary_line(g: pd.DataFrame) -> str:
    name = g["dataset"].iloc[0]
    fmt = "{:.1f}" if g["metric"].iloc[0] == "acc" else "{:.3f}"
    sub = g.set_index(["role", "modality"])
    cells = []
    for role in ("teacher", "joint"):
        for (r, m), row in sub.iterrows():
            if r == role and (role == "teacher" or m == "fused"):
                tgt = "" if pd.isna(row["target"]) else f" ({fmt.format(row['target'])})"
                cells.append(f"{'T' if role == 'teacher' else 'J'}-{m} {fmt.format(row['mean'])}{tgt}")
    ok = all(imbalance_checks(g, name).values())
    return f"| {name} | {'; '.join(cells)} | {'yes' if ok else 'NO'} | {sub['sec_per_run'].max():.1f} |"


def render_markdown(table: pd.DataFrame) -> str:
    lines = [
        "# Stand-in calibration",
        "",
        "**These are generated stand-ins, not the real datasets.** Each embedded dataset is synthesised by",
        "`g2d/data/standin.py` with per-modality informativeness and learnability knobs, calibrated once,",
        "method-agnostically, against the published unimodal-teacher and Joint-Train figures only (no",
        "imbalance method was run or looked at). Figures: test at the trainer.select epoch, mean +- std",
        "over seeds; targets are the published numbers (official protocol: best test epoch, real data),",
        "so only orders of magnitude and the imbalance pattern are comparable.",
        "Regenerate with `python -m g2d.calibrate` (`g2d calibrate`); run costs are wall seconds per",
        "training run (incl. per-epoch val/test evaluation) with one torch thread on a shared 2-core CPU.",
        "",
        "| dataset | teachers (T) and Joint-Train fused (J), ours (target) | imbalance pattern | s/run (max) |",
        "|---|---|---|---|",
        *[_summary_line(g) for _, g in table.groupby("dataset", sort=False)],
        "",
        "Imbalance pattern = under Joint-Train the dominant modality's head keeps >= 75% of its teacher's "
        "accuracy margin over chance and every weak head keeps <= 50% (MIS-ME: see its note).",
        "",
    ]
    for name, g in table.groupby("dataset", sort=False):
        t = TARGETS.get(name, {})
        metric = g["metric"].iloc[0]
        unit = "test accuracy (%)" if metric == "acc" else "test R^2"
        fmt = (lambda x: f"{x:.1f}") if metric == "acc" else (lambda x: f"{x:.3f}")
        lines += [f"## {name}", "", f"Metric: {unit}. Target source: {t.get('source', '-')}.", "",
                  f"Expected imbalance: **{t.get('dominant')}** dominant under Joint-Train; weak: "
                  f"{', '.join(t.get('weak', []))}.", "",
                  "| run | head | ours (mean +- std) | seeds | target |", "|---|---|---|---|---|"]
        for _, r in g.iterrows():
            tgt = "-" if pd.isna(r["target"]) else fmt(r["target"])
            lines.append(f"| {'teacher' if r.role == 'teacher' else 'Joint-Train'} | {r.modality} | "
                         f"{fmt(r['mean'])} +- {fmt(r['std'])} | {r['values']} | {tgt} |")
        checks = imbalance_checks(table, name)
        lines += ["", "Checks: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()) + ".", ""]
        if name in NOTES:
            lines += [f"Note: {NOTES[name]}", ""]
        cost = g.drop_duplicates("role").set_index("role")["sec_per_run"]
        lines += [f"Per-run cost: teacher {cost.get('teacher', float('nan')):.1f} s, "
                  f"Joint-Train {cost.get('joint', float('nan')):.1f} s.", ""]
        sc = json.loads(g["standin"].iloc[0])
        val = f"n_val {sc['n_val']} (drawn separately)" if sc.get("n_val") else "val carved from train"
        lines += [f"Stand-in: n_train {sc['n_train']}, {val}, n_test {sc['n_test']}, pairs {sc['pairs']}"
                  + (f", n_factors {sc['n_factors']}" if metric != "acc" else "") + "; knobs:", "",
                  "| modality | shape | code | pair_code | bits | pair_signal | flip | noise | amplitude | pixel_noise "
                  "| density | motif | active_steps | factors |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, k in sc["modalities"].items():
            lines.append(f"| {m} | {k['shape']} | {k['code']} | {k.get('pair_code') or '='} | {k['bits'] or 'auto'} | "
                         f"{k['pair_signal']} | {k['flip']} | {k['noise']} | {k['amplitude']} | {k['pixel_noise']} | "
                         f"{k['density']} | {k['motif']} | {k['active_steps']} | {k['factors'] or 'all'} |")
        tr, mo = json.loads(g["trainer"].iloc[0]), json.loads(g["model"].iloc[0])
        lines += ["", f"Trainer: {tr['optimizer']} lr {tr['lr']} batch {tr['batch_size']} epochs {tr['epochs']} "
                      f"threads {tr['num_threads']}; model: resnet {mo['resnet']}, mlp_hidden {mo['mlp_hidden']}, "
                      f"seq_hidden {mo['seq_hidden']}, fusion {mo['fusion']}.", ""]
    lines += ["## Findings", "", *[f"- {f}" for f in FINDINGS], ""]
    return "\n".join(lines) + "\n"


def write_outputs(results: list[dict], out_md: Path, out_csv: Path) -> pd.DataFrame:
    """Merge into the committed CSV (replacing re-run datasets) and re-render the Markdown."""
    new = pd.concat([summarise(r) for r in results], ignore_index=True)
    if out_csv.is_file():
        old = pd.read_csv(out_csv)
        old = old[~old.dataset.isin(new.dataset.unique())]
        new = pd.concat([old, new], ignore_index=True)
    order = {d: i for i, d in enumerate(DATASETS)}
    new = new.sort_values("dataset", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    new.to_csv(out_csv, index=False, float_format="%.4f")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(render_markdown(new))
    return new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="g2d calibrate", description="\n".join(__doc__.splitlines()[:6]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="slow: it trains every teacher and Joint-Train of each dataset and seed "
                                        "(the tests run it under `-m slow`).")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS, metavar="DATASET",  # --train
                    help=f"datasets to calibrate (default: all of {', '.join(DATASETS)})")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    ap.add_argument("--train", action="store_true",
                    help="knob search: train teachers + Joint-Train into --work and report there")
    ap.add_argument("--out", type=Path, default=None,
                    help="--train report (default: <work>/calibration.md)")
    ap.add_argument("--csv", type=Path, default=None,
                    help="--train figures (default: <work>/calibration.csv)")
    ap.add_argument("--work", type=Path, default=Path("data/calibration"),
                    help="prepared data + runs go here (default: data/calibration)")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--render-only", action="store_true", help="re-render --out from the existing --csv")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="Hydra overrides of params.yaml, e.g. trainer.num_threads=1 (before or after the flags)")
    args = ap.parse_intermixed_args(argv)
    args.out = args.out or args.work / "calibration.md"
    args.csv = args.csv or args.work / "calibration.csv"
    if not args.train and not args.render_only:
        from g2d.report.calibration import write

        cfg = C.load_config(list(args.overrides), args.params)
        for p in write(cfg, Path(cfg.paths.reports)):
            print(f"[g2d] wrote {p}")
        return 0
    if args.render_only:
        args.out.write_text(render_markdown(pd.read_csv(args.csv)))
        print(f"[calibrate] wrote {args.out}")
        return 0
    results = []
    for name in args.datasets:
        over = [*BASE_OVERRIDES, *args.overrides]
        res = calibrate_dataset(name, args.seeds, over, args.params, args.work)
        results.append(res)
    table = write_outputs(results, args.out, args.csv)
    for name in args.datasets:
        for k, ok in imbalance_checks(table, name).items():
            print(f"[calibrate] {name}: {k}: {'yes' if ok else 'NO'}")
    print(f"[calibrate] wrote {args.out} and {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
