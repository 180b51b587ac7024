"""`g2d` command line: list | fetch | prepare | train | teacher | verify | codehash | summarise | aggregate | report | calibrate | compare.

Arguments of the form key=value are Hydra overrides of params.yaml (`trainer.epochs=5`), accepted before
or after the flags of a command.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import io
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

from g2d import config as C
from g2d import registry
from g2d.data.prepared import PreparedError
from g2d.data.raw.fetching import ManualStepRequired, RawDataError

EPILOG = """\
overrides: every key=value argument is a Hydra override of params.yaml, in any position after the command:
`g2d train method=g2d dataset=cremad seed=1 trainer.epochs=5` (new keys need a leading `+`, `~key` deletes).
`g2d <command> --help` shows each command's arguments; README.md has the walk-through.
errors: a user error prints one line `g2d: error: <file or key>: <problem and fix>` on stderr (a
manual download step lists its steps below that line); `--debug` or G2D_DEBUG=1 prints the
traceback first. Nothing is written before the configuration and the run's inputs are checked.
exit codes:
  0  ok
  1  data, runtime or file-system error: missing or corrupt raw / prepared data, missing teachers,
     a non-finite loss, disk full, a read-only or blocked path, a non-UTF-8 or corrupt JSON file
  2  configuration or command-line error: params.yaml syntax (line given) or values (ranges and
     choices of g2d/config_checks.py CHECKS), overrides, unknown names, a method's own parameter checks,
     a device that is not there, a fetch/prepare-only key (datasets.<d>.real|standin.*,
     datasets.<d>.val_fraction|split_seed, paths.raw, data_source) given to train or teacher
"""

TRAIN_HELP = """\
The run is chosen by overrides of params.yaml (defaults: its `method`, `dataset`, `seed`):
  method=NAME    a registered method or variant (`g2d list`), e.g. method=g2d
  dataset=NAME   a dataset or view, e.g. dataset=cremad
  seed=N         one seed (--all-seeds: every seed of suite.seeds, or suite.dataset_seeds.<dataset>)
examples:
  g2d train method=g2d dataset=cremad seed=1 trainer.epochs=5
  g2d train --all-seeds --group main method=joint --summary reports/runs
"""

# keys that only `g2d fetch` / `g2d prepare` read: `train` and `teacher` read the prepared arrays instead
PREPARE_ONLY = re.compile(r"data_source|paths\.raw|datasets\.[^.]+\.(real|standin|val_fraction|split_seed)(\..*)?")


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


def _seeds(args, cfg, dataset: str) -> list[int]:
    return C.suite_seeds(cfg, dataset) if args.all_seeds else [cfg.seed]


def _no_prepare_keys(args) -> None:
    """`train` / `teacher` read the prepared arrays: a fetch/prepare option given to them would be ignored."""
    for o in args.overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if PREPARE_ONLY.fullmatch(key):
            ds = key.split(".")[1] if key.startswith("datasets.") else "<dataset>"
            raise C.ConfigError(f"{key}: read by `g2d fetch` / `g2d prepare` only, `g2d {args.cmd}` trains on the "
                                f"prepared data (paths.prepared): run `g2d prepare {ds} {o}` first (or set it "
                                f"in {args.params}), then {args.cmd} without it")


def _preflight(cfg: C.Schema, args, pairs: list[tuple[str, str, str | None]], seeds: dict[str, list[int]]) -> None:
    """Everything a run checks before its first write, for every run of the command (a later run's bad
    value must not fail after earlier runs wrote their folders): device, prepared data, method, teachers."""
    from g2d.data.prepared import Prepared
    from g2d.runs import prepared_dir
    from g2d.train.seeding import resolve_device
    from g2d.train.trainer import teacher_path

    for method, ds, modality in pairs:
        tc = C.trainer_config(cfg, ds)
        try:
            resolve_device(tc.device)
        except RuntimeError as e:
            raise C.ConfigError(f"{args.params}: {e}") from None
        full = Prepared(prepared_dir(cfg, ds)).spec
        wanted = registry.get_dataset(ds).spec.modality_names
        missing = [m for m in wanted if m not in full.modality_names]
        if missing:
            raise PreparedError(f"{prepared_dir(cfg, ds)}: has no modality {missing} of {ds}; re-run `g2d prepare`")
        spec = dataclasses.replace(full, name=ds, modalities=tuple(full.modality(m) for m in wanted))
        mcfg = cfg
        if modality:  # a teacher: its modality is the unimodal method's parameter (as g2d.runs does)
            mcfg = dataclasses.replace(cfg, methods={**cfg.methods, "unimodal": {
                **(cfg.methods.get("unimodal") or {}), "modality": modality}})
        cls = registry.get_method(method)
        try:
            inst = cls(C.method_params(mcfg, method, ds), spec)
        except ValueError as e:
            if isinstance(e, C.ConfigError):
                raise
            raise C.ConfigError(f"{args.params}: {e} ({method} on {ds})") from None
        if cls.needs_teachers:
            for m in inst.modalities():
                for seed in seeds[ds]:
                    path = teacher_path(Path(cfg.paths.runs), ds, m, seed)
                    if not path.is_file():
                        base = registry.get_dataset(ds).view_of or ds
                        raise FileNotFoundError(f"teacher checkpoint {path} not found: {method} distils from "
                                                f"teachers; train them first (`g2d teacher {base} --all-seeds` "
                                                f"or `dvc repro teacher@{base}`)")


def cmd_train(args) -> None:
    """One method on one dataset, or (`--group G`) on every dataset of suite.groups.G."""
    cfg = _cfg(args)
    _no_prepare_keys(args)
    from g2d.runs import train_group, train_many

    mod = C.method_params(cfg).modality if cfg.method == "unimodal" else None
    if args.group:
        if args.group not in cfg.suite.groups:
            raise C.ConfigError(f"--group {args.group!r} not in suite.groups ({', '.join(cfg.suite.groups)})")
        group = cfg.suite.groups[args.group]
        if cfg.method not in group.methods:
            raise C.ConfigError(f"method {cfg.method!r} is not in suite.groups.{args.group}.methods")
        runs = Path(cfg.paths.runs) / args.group / cfg.method
        pairs = [(cfg.method, ds, None) for ds in group.datasets]
        seeds = {ds: _seeds(args, cfg, ds) for ds in group.datasets}
        _preflight(cfg, args, pairs, seeds)
        _train_with_progress(cfg, lambda p: train_many(cfg, pairs, seeds, args.summary, runs, force=args.force,
                                                       progress=p), sum(map(len, seeds.values())))
    else:
        seeds = _seeds(args, cfg, cfg.dataset)
        _preflight(cfg, args, [(cfg.method, cfg.dataset, mod)], {cfg.dataset: seeds})
        _train_with_progress(cfg, lambda p: train_group(cfg, cfg.method, cfg.dataset, seeds, mod, args.summary,
                                                        force=args.force, progress=p), len(seeds))


def _train_with_progress(cfg: C.Schema, train, n_runs: int) -> None:
    """Run `train(progress)` under the parent's progress display (stage k/n and a suite ETA under
    `dvc repro`, see g2d/progress.py). SIGINT/SIGTERM: one line, exit code 130 / 143, finished runs kept."""
    from g2d.progress import Progress, clear_line_on_stderr, stage_plan
    from g2d.runs import Interrupted, n_workers, scratch_root

    stage = os.environ.get("DVC_STAGE")
    try:
        plan = stage_plan(stage, scratch_root(cfg).parent, Path(cfg.paths.runs), n_workers(cfg, n_runs))
    except Exception:  # noqa: BLE001 - the plan only decorates the display
        plan = None
    progress = Progress(n_runs, stage=stage, plan=plan)  # holds the raw stderr for its status line
    clear_line_on_stderr()  # what the trainer prints in this process replaces the status line, not extends it
    try:
        train(progress)
    except Interrupted as e:
        progress.close()
        print(f"[g2d] {e}", file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None
    progress.finish()


def cmd_teacher(args) -> None:
    """`g2d teacher cremad [--modality audio]`: unimodal teachers of a dataset (every modality by default)."""
    cfg = _cfg(args)
    _no_prepare_keys(args)

    spec = registry.get_dataset(args.name).spec
    if registry.get_dataset(args.name).view_of:
        raise C.ConfigError(f"{args.name} is a view of {registry.get_dataset(args.name).view_of}: "
                            "views use their parent's teachers")
    mods = [args.modality] if args.modality else list(spec.modality_names)
    for m in mods:
        if m not in spec.modality_names:
            raise C.ConfigError(f"{args.name} has no modality {m!r} ({', '.join(spec.modality_names)})")
    from g2d.runs import train_many

    pairs = [("unimodal", args.name, m) for m in mods]
    seeds = _seeds(args, cfg, args.name)
    _preflight(cfg, args, pairs, {args.name: seeds})
    _train_with_progress(cfg, lambda p: train_many(cfg, pairs, seeds, args.summary, force=args.force,
                                                   progress=p), len(pairs) * len(seeds))


def cmd_verify(args) -> None:
    """`g2d verify <dataset>`: every prepared array against meta.json (header, size, labels, sha256); one line
    per problem on stdout, then exit 1 (also when meta.json records no hashes: nothing to verify against)."""
    cfg = _cfg(args)
    from g2d.data.prepared import Prepared
    from g2d.runs import prepared_dir

    name = args.dataset or cfg.dataset
    data = Prepared(prepared_dir(cfg, name), check="none")  # a bad meta.json is a PreparedError itself
    problems = data.problems(hashes=True, note_missing=False)
    if not data.hashes_recorded():
        problems.append(f"{data.root / 'meta.json'}: records no sha256 for its arrays (prepared by an older g2d): "
                        f"regenerate it with `g2d prepare {data.meta['name']}`")
    for line in problems:
        print(line)
    if problems:
        raise PreparedError(f"{data.root}: {len(problems)} problem(s); {data.fix()}")
    n = sum(len(v) for v in data.meta["arrays"].values())
    print(f"[g2d] {data.root}: {n} arrays match meta.json (shape, dtype, size, labels, sha256)")


def cmd_summarise(args) -> None:
    cfg = _cfg(args)
    from g2d.runs import summarise

    out = Path(cfg.paths.reports) / "runs"
    n = summarise(cfg, out)
    print(f"[g2d] wrote {n} summaries (json + csv) in {out}/ from the runs in {cfg.paths.runs}/")


def cmd_aggregate(args) -> None:
    cfg = _cfg(args)
    from g2d.report.aggregate import aggregate

    for p in aggregate(Path(cfg.paths.reports), cfg.trainer.select):
        print(f"[g2d] wrote {p}")


def cmd_report(args) -> None:
    cfg = _cfg(args)
    from g2d.report.render import render_all

    for p in render_all(cfg, Path(cfg.paths.reports)):
        print(f"[g2d] wrote {p}")
    rep = Path(cfg.paths.reports).as_posix()
    print(f"reports: {rep}/index.html, {rep}/*.md (tables: {rep}/tables/)")


def cmd_compare(args) -> None:
    cfg = _cfg(args)
    from g2d.report.compare import compare

    for p in compare(Path(cfg.paths.reports), args.method, cfg.trainer.select):  # the rule the tables report
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


def _debug(argv: list[str]) -> bool:
    return os.environ.get("G2D_DEBUG", "").strip() not in ("", "0") or "--debug" in argv


def main(argv: list[str] | None = None) -> int:
    startup, started = _process_age(), time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("G2D_TIMING_LOG"):  # count torch + registry imports as start-up, not as work
        registry.load_all()
        startup += time.perf_counter() - started
        started = time.perf_counter()
    rc = _main(argv)
    try:
        _log_timing(argv, started, startup, rc)
    except OSError as e:
        if _debug(argv):
            traceback.print_exception(e)
        print(f"g2d: error: G2D_TIMING_LOG={os.environ.get('G2D_TIMING_LOG')}: {e.strerror or e}; the command "
              f"finished (exit code {rc}) but its timing line was not written: fix or unset G2D_TIMING_LOG",
              file=sys.stderr)
        rc = rc or 1
    return rc


def _io_file(exc: BaseException) -> str | None:
    """The file a decode error came from (the exception does not say): the innermost frame of its traceback
    that holds an open file, or a Path to an existing file."""
    tb, frames = exc.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        local = frame.f_locals
        for v in local.values():
            if isinstance(v, io.IOBase) and isinstance(getattr(v, "name", None), str):
                return v.name
        for v in local.values():
            if isinstance(v, Path) and v.is_file():
                return str(v)
    return None


# the fix for each file-system error (after "<path>: <strerror>")
_OS_HINTS = {
    errno.ENOSPC: "free space, or point paths.* in params.yaml (or --summary) to another disk",
    errno.EROFS: "point paths.* in params.yaml (or --summary) to a writable folder",
    errno.EACCES: "point paths.* in params.yaml (or --summary) to a folder you can write",
    errno.EPERM: "point paths.* in params.yaml (or --summary) to a folder you can write",
    errno.EISDIR: "a folder is where a file is expected: remove or rename it",
    errno.ENOTDIR: "a part of this path is a file, not a folder: remove that file or point paths.* elsewhere",
    errno.EEXIST: "a file is in the way of a folder: remove it or point paths.* in params.yaml elsewhere",
}


def _message(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for an error of a type the CLI reports (see EPILOG)."""
    if isinstance(e, (C.ConfigError, registry.RegistryError)):
        return str(e), 2
    if isinstance(e, UnicodeDecodeError):
        f = _io_file(e)
        bad = f"byte 0x{e.object[e.start]:02x} at offset {e.start}" if e.start < len(e.object) else e.reason
        head = f"{f}: " if f else ""
        tail = "save it as UTF-8" if f else "save the input as UTF-8 (--debug shows which file)"
        return f"{head}not UTF-8 text ({bad}); {tail}", 1
    if isinstance(e, json.JSONDecodeError):
        f = _io_file(e)
        return (f"{f or 'a JSON file'}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno}); re-create it "
                f"(e.g. re-run the `g2d` command that wrote it){'' if f else ' (--debug shows which file)'}"), 1
    if isinstance(e, OSError) and e.errno is not None and not isinstance(e, RawDataError):
        target = "" if e.filename is None else f"{e.filename}: " if e.filename2 is None else \
            f"{e.filename} -> {e.filename2}: "
        hint = _OS_HINTS.get(e.errno)
        return f"{target}{e.strerror or e}" + (f"; {hint}" if hint else ""), 1
    if isinstance(e, (RawDataError, PreparedError, NotImplementedError, OSError)):
        return str(e), 1
    from g2d.methods.base import NonFiniteLoss

    if isinstance(e, NonFiniteLoss):
        return str(e), 1
    if isinstance(e, ValueError):  # a method's / dataset's own parameter check
        return str(e), 2
    raise TypeError(f"not a reported error: {type(e).__name__}")


def _report(e: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exception(e)
    msg, rc = _message(e)
    if not isinstance(e, ManualStepRequired):  # a manual step keeps its numbered steps below the line
        msg = " ".join(msg.split())
    print(f"g2d: error: {msg}", file=sys.stderr)
    return rc


def _main(argv: list[str]) -> int:
    if argv[:1] == ["calibrate"]:  # its own argument parser (g2d/calibrate.py)
        from g2d.calibrate import main as calibrate

        return calibrate(argv[1:])
    ap = argparse.ArgumentParser(prog="g2d", description=__doc__.splitlines()[0], epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--debug", action="store_true", help="print the traceback of an error (also G2D_DEBUG=1)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def add(name, fn, help_, dataset=False, seeds=False, extra=""):
        p = sub.add_parser(name, help=help_, description=help_ + (f"\n\n{extra}" if extra else ""),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if dataset:
            p.add_argument("dataset", nargs="?", help="dataset name (default: params.yaml `dataset`)")
        if seeds:
            p.add_argument("--all-seeds", action="store_true", help="train every seed in suite.seeds")
            p.add_argument("--group", default=None, help="train on every dataset of suite.groups.<GROUP>")
            p.add_argument("--summary", type=Path, default=None,
                           help="also write <dir>/<run>.json and .csv summaries (e.g. reports/runs)")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="Hydra overrides of params.yaml, e.g. trainer.epochs=5 (before or after the flags)")
        p.set_defaults(fn=fn)
        return p

    add("list", cmd_list, "list registered methods, plug-ins and datasets")
    add("fetch", cmd_fetch, "download and verify a real dataset", dataset=True)
    add("prepare", cmd_prepare, "raw -> prepared tensors (or generate the stand-in)", dataset=True)
    tr = add("train", cmd_train, "train one method on one dataset", seeds=True, extra=TRAIN_HELP)
    t = add("teacher", cmd_teacher, "train unimodal teachers: g2d teacher <dataset> [--modality M]", seeds=True,
            extra="example: g2d teacher cremad --all-seeds trainer.epochs=5 (writes data/runs/teachers/...)")
    t.add_argument("name", help="dataset, e.g. cremad")
    t.add_argument("--modality", default=None, help="one modality (default: every modality)")
    t._actions.insert(0, t._actions.pop(-2))  # the dataset positional comes before the overrides
    for p in (tr, t):
        p.add_argument("--force", action="store_true",
                       help="retrain runs whose folder already holds a finished run of the same config")
    add("verify", cmd_verify, "check a prepared dataset: every array's shape, size and sha256 against meta.json",
        dataset=True)
    add("codehash", cmd_codehash, "write per-method code fingerprints (data/code/<method>.txt)")
    add("summarise", cmd_summarise, "finished runs (data/runs) -> the committed per-run summaries (reports/runs)")
    add("aggregate", cmd_aggregate, "per-run summaries -> tidy tables (reports/tables/*.csv)")
    add("report", cmd_report, "tables -> rendered reports (Markdown, LaTeX, HTML)")
    sub.add_parser("calibrate", add_help=False,
                   help="calibrate the embedded stand-ins (teachers + Joint-Train); `g2d calibrate --help`")
    c = add("compare", cmd_compare, "paired per-seed comparison of one method against the whole suite",
            extra="Reads reports/tables/runs.csv (run `g2d aggregate` first), writes reports/compare/<method>.md\n"
                  "and .csv: per dataset and rival, the paired difference, a 95% t-interval, the paired t-test p\n"
                  "and its Holm-corrected value over all the comparisons of the report.")
    c.add_argument("method", help="registered method name, e.g. g2d")
    c._actions.insert(0, c._actions.pop())
    # overrides may follow the flags (`g2d train --all-seeds trainer.epochs=1`): argparse leaves positionals
    # after an option unmatched, so the leftover key=value / ~key words are appended to the overrides
    args, rest = ap.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    bad = [o for o in args.overrides if "=" not in o and not o.startswith("~")]
    if bad:
        ap.error(f"unexpected argument(s) {bad}: overrides look like key=value")
    from g2d.methods.base import NonFiniteLoss

    try:
        args.fn(args)
    except (C.ConfigError, registry.RegistryError, RawDataError, PreparedError, NonFiniteLoss, NotImplementedError,
            OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError; FileNotFoundError an OSError
        return _report(e, args.debug or _debug([]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
