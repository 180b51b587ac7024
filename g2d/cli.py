"""`g2d` command line: list | fetch | prepare | train | teacher | aggregate | report.

Arguments of the form key=value are Hydra overrides of params.yaml (`trainer.epochs=5`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from g2d import config as C
from g2d import registry
from g2d.data.raw.fetching import RawDataError


def _cfg(args) -> C.Schema:
    return C.load_config(args.overrides, args.params)


def cmd_list(args) -> None:
    print("methods: " + ", ".join(registry.list_methods()))
    plugins = registry.list_plugins()
    if plugins:
        print("plug-ins (method+plugin): " + ", ".join(plugins))
    print("datasets: " + ", ".join(registry.list_datasets()))


def cmd_prepare(args) -> None:
    cfg = _cfg(args)
    from g2d.runs import prepared_dir

    name = args.dataset or cfg.dataset
    ds = registry.get_dataset(name)(C.dataset_config(cfg, name))
    out = prepared_dir(cfg, name)
    t0 = time.perf_counter()
    if cfg.data_source == "standin":
        ds.standin(out, seed=cfg.seed)
        what = "stand-in"
    else:
        ds.prepare(Path(cfg.paths.raw) / name, out)
        what = "real"
    print(f"[g2d] prepared {what} {name} -> {out} ({time.perf_counter() - t0:.1f}s)")


def cmd_fetch(args) -> None:
    cfg = _cfg(args)
    name = args.dataset or cfg.dataset
    raw = Path(cfg.paths.raw) / name
    if cfg.data_source == "standin":
        # the embedded suite generates its data: record that nothing was downloaded
        from g2d.data.prepared import atomic_write_text

        atomic_write_text(raw / "STANDIN.txt", f"{name}: embedded stand-in suite, nothing fetched "
                          "(set data_source=real or profile=paper to download the real dataset)\n")
        print(f"[g2d] {name}: stand-in suite, nothing to fetch")
        return
    ds = registry.get_dataset(name)(C.dataset_config(cfg, name))
    path = ds.fetch(raw)
    print(f"[g2d] {name}: raw data verified in {path}")


def cmd_codehash(args) -> None:
    cfg = _cfg(args)
    from g2d.codehash import write_all

    methods = [m for g in cfg.suite.groups.values() for m in g.methods]
    paths = write_all(methods, Path("data/code"))
    print(f"[g2d] code fingerprints for {len(paths)} methods in data/code/")


def _seeds(args, cfg) -> list[int]:
    return list(cfg.suite.seeds) if args.all_seeds else [cfg.seed]


def cmd_train(args) -> None:
    """One method on one dataset, or (`--group G`) on every dataset of suite.groups.G."""
    cfg = _cfg(args)
    from g2d.runs import train_group, train_many

    mod = C.method_params(cfg).modality if cfg.method == "unimodal" else None
    if args.group:
        if args.group not in cfg.suite.groups:
            raise C.ConfigError(f"--group {args.group!r} not in suite.groups ({', '.join(cfg.suite.groups)})")
        group = cfg.suite.groups[args.group]
        if cfg.method not in group.methods:
            raise C.ConfigError(f"method {cfg.method!r} is not in suite.groups.{args.group}.methods")
        runs = Path(cfg.paths.runs) / args.group / cfg.method
        train_many(cfg, [(cfg.method, ds, None) for ds in group.datasets], _seeds(args, cfg), args.summary, runs)
    else:
        train_group(cfg, cfg.method, cfg.dataset, _seeds(args, cfg), mod, args.summary)


def cmd_teacher(args) -> None:
    """`g2d teacher cremad [--modality audio]`: unimodal teachers of a dataset (every modality by default)."""
    cfg = _cfg(args)

    spec = registry.get_dataset(args.name).spec
    if registry.get_dataset(args.name).view_of:
        raise C.ConfigError(f"{args.name} is a view of {registry.get_dataset(args.name).view_of}: "
                            "views use their parent's teachers")
    mods = [args.modality] if args.modality else list(spec.modality_names)
    for m in mods:
        if m not in spec.modality_names:
            raise C.ConfigError(f"{args.name} has no modality {m!r} ({', '.join(spec.modality_names)})")
    from g2d.runs import train_many

    train_many(cfg, [("unimodal", args.name, m) for m in mods], _seeds(args, cfg), args.summary)


def cmd_aggregate(args) -> None:
    cfg = _cfg(args)
    from g2d.report.aggregate import aggregate

    for p in aggregate(Path(cfg.paths.reports)):
        print(f"[g2d] wrote {p}")


def cmd_report(args) -> None:
    cfg = _cfg(args)
    from g2d.report.render import render_all

    for p in render_all(cfg, Path(cfg.paths.reports)):
        print(f"[g2d] wrote {p}")


def cmd_compare(args) -> None:
    cfg = _cfg(args)
    from g2d.report.compare import compare

    for p in compare(Path(cfg.paths.reports), args.method):
        print(f"[g2d] wrote {p}")


def _process_age() -> float:
    """Seconds since this process started (interpreter + imports), from /proc where available."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = float(Path("/proc/uptime").read_text().split()[0])
        return boot - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _log_timing(argv, started: float, startup: float, rc: int) -> None:
    """G2D_TIMING_LOG=<file>: one JSON line per command (used by benchmarks/suite_time.py)."""
    path = os.environ.get("G2D_TIMING_LOG")
    if path:
        rec = {"argv": argv, "startup_s": startup, "run_s": time.perf_counter() - started, "rc": rc}
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def main(argv: list[str] | None = None) -> int:
    startup, started = _process_age(), time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("G2D_TIMING_LOG"):  # count torch + registry imports as start-up, not as work
        registry.load_all()
        startup += time.perf_counter() - started
        started = time.perf_counter()
    rc = _main(argv)
    _log_timing(argv, started, startup, rc)
    return rc


def _main(argv: list[str]) -> int:
    if argv[:1] == ["calibrate"]:  # its own argument parser (g2d/calibrate.py)
        from g2d.calibrate import main as calibrate

        return calibrate(argv[1:])
    ap = argparse.ArgumentParser(prog="g2d", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def add(name, fn, help_, dataset=False, seeds=False):
        p = sub.add_parser(name, help=help_)
        if dataset:
            p.add_argument("dataset", nargs="?", help="dataset name (default: params.yaml `dataset`)")
        if seeds:
            p.add_argument("--all-seeds", action="store_true", help="train every seed in suite.seeds")
            p.add_argument("--group", default=None, help="train on every dataset of suite.groups.<GROUP>")
            p.add_argument("--summary", type=Path, default=None,
                           help="also write <dir>/<run>.json and .csv summaries (e.g. reports/runs)")
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.epochs=5")
        p.set_defaults(fn=fn)
        return p

    add("list", cmd_list, "list registered methods, plug-ins and datasets")
    add("fetch", cmd_fetch, "download and verify a real dataset", dataset=True)
    add("prepare", cmd_prepare, "raw -> prepared tensors (or generate the stand-in)", dataset=True)
    add("train", cmd_train, "train one method on one dataset", seeds=True)
    t = add("teacher", cmd_teacher, "train unimodal teachers: g2d teacher <dataset> [--modality M]", seeds=True)
    t.add_argument("name", help="dataset, e.g. cremad")
    t.add_argument("--modality", default=None, help="one modality (default: every modality)")
    t._actions.insert(0, t._actions.pop(-2))  # the dataset positional comes before the overrides
    add("codehash", cmd_codehash, "write per-method code fingerprints (data/code/<method>.txt)")
    add("aggregate", cmd_aggregate, "per-run summaries -> tidy tables (reports/tables/*.csv)")
    add("report", cmd_report, "tables -> rendered reports (Markdown, LaTeX, HTML)")
    sub.add_parser("calibrate", add_help=False,
                   help="calibrate the embedded stand-ins (teachers + Joint-Train); `g2d calibrate --help`")
    c = add("compare", cmd_compare, "paired per-seed comparison of one method against the whole suite")
    c.add_argument("method", help="registered method name, e.g. g2d")
    c._actions.insert(0, c._actions.pop())
    args = ap.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o and not o.startswith("~")]
    if bad:
        ap.error(f"unexpected argument(s) {bad}: overrides look like key=value")
    try:
        args.fn(args)
    except (C.ConfigError, registry.RegistryError) as e:
        print(f"g2d: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotImplementedError, RawDataError) as e:
        print(f"g2d: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
