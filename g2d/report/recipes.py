"""reports/recipes.md: the `paper` profile as explicit recipes, every value next to its source.

`profiles.paper` in params.yaml sets every value that differs from the embedded defaults for the official
recipe (plus a few kept equal on purpose, to state them), and `profiles.paper.sources` maps each of those
values' dotted keys (`trainer.lr`, `datasets.cremad.augment.visual.recipe`, `methods.ogm_ge.alpha`, ...) to
where it comes from, in one of three forms (`SOURCE_FORMS`): a paper section or table, an official
repository file at a commit (`owner/repo:path@commit`), or "not published: our choice, because ...".

The page has one table of global settings, then one table per dataset (rows: setting, value, embedded
default, source; the default column says whether the profile changes the value), the methods that run on
the dataset (suite groups) and, per (method, dataset), every method parameter that differs from the code's
defaults after the per-dataset overrides are merged in. `g2d report` writes it (render.py); so does
`python -m g2d.report.recipes [params.yaml] [out.md]`. tests/unit/test_recipes.py checks that every value
has a source, that no source is stale, and that each table cell equals the params value.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

PROFILE = "paper"
TITLES = {"cremad": "CREMA-D", "avmnist": "AV-MNIST", "vggsound": "VGGSound", "urfunny": "UR-Funny",
          "iemocap": "IEMOCAP", "misme": "MIS-ME"}
SOURCE_FORMS = {
    "paper": re.compile(r"\bpaper\b.*?(§|\bsection\b|\bSec\.|\bTable\b|\bFig\.?|\bEq\.)", re.I),
    "repository": re.compile(r"\b[\w.-]+/[\w.-]+:[\w./+-]+@[0-9a-f]{7,40}\b"),
    "our choice": re.compile(r"^not published: our choice, because \S"),
}
MISSING = object()


# ---- profile leaves and their sources -------------------------------------------------------------
def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf: scalars, lists and empty mappings (a non-empty mapping recurses)."""
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def profile_leaves(profile: dict) -> dict[str, Any]:
    """The profile's values (its `sources` mapping excluded)."""
    return leaves({k: v for k, v in (profile or {}).items() if k != "sources"})


def source_forms(source: str) -> list[str]:
    """Which of the accepted source forms a source string has (empty: none, so it is not a source)."""
    return [name for name, rx in SOURCE_FORMS.items() if rx.search(source or "")]


def check_sources(profile: dict) -> list[str]:
    """Problems with a profile's sources: values without one, stale keys, sources of no accepted form."""
    vals, srcs = profile_leaves(profile), dict((profile or {}).get("sources") or {})
    errors = [f"{k}: no source in profiles.{PROFILE}.sources" for k in vals if not str(srcs.get(k) or "").strip()]
    errors += [f"sources.{k}: names no value of profiles.{PROFILE} (stale source)" for k in srcs if k not in vals]
    errors += [f"sources.{k}: {s!r} is none of the forms {list(SOURCE_FORMS)}" for k, s in srcs.items()
               if k in vals and str(s or "").strip() and not source_forms(str(s))]
    return errors


# ---- values -----------------------------------------------------------------------------------------
def fmt_value(v: Any) -> str:
    """YAML flow style that `yaml.safe_load` reads back to the same value (floats round-trip exactly)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return ".inf" if v > 0 else "-.inf"
        if math.isnan(v):
            return ".nan"
        r = repr(v)
        if "e" in r:  # YAML 1.1 floats need a dot in the mantissa and a signed exponent: 1e-05 -> 1.0e-05
            mant, exp = r.split("e")
            mant = mant if "." in mant else mant + ".0"
            exp = exp if exp[0] in "+-" else "+" + exp
            r = f"{mant}e{exp}"
        return r
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def _walk(tree: Any, parts: list[str]) -> Any:
    for p in parts:
        if not isinstance(tree, dict) or p not in tree:
            return MISSING
        tree = tree[p]
    return tree


def lookup(cfg, key: str) -> Any:
    """The value a run under `cfg` uses for a profile key (per-dataset overrides merged), or MISSING."""
    from g2d import config as C
    from g2d import registry

    parts = key.split(".")
    try:
        if parts[0] == "methods" and len(parts) >= 3:
            return _walk(C.to_dict(C.method_params(cfg, parts[1])), parts[2:])
        if parts[0] == "datasets" and len(parts) >= 3:
            ds, sub = parts[1], parts[2]
            if sub == "trainer":
                return _walk(C.to_dict(C.trainer_config(cfg, ds)), parts[3:])
            if sub == "methods" and len(parts) >= 5:
                return _walk(C.to_dict(C.method_params(cfg, parts[3], ds)), parts[4:])
            if sub == "augment" and len(parts) >= 4:
                from g2d.data.transforms import resolve_augment

                dcls = registry.get_dataset(ds)
                aug = resolve_augment(getattr(dcls, "augment", {}) or {}, C.dataset_config(cfg, ds).augment, dcls.spec)
                return _walk(C.to_dict(aug[parts[3]]), parts[4:]) if parts[3] in aug else MISSING
            return _walk(C.to_dict(C.dataset_config(cfg, ds)), parts[2:])
        return _walk(C.to_dict(cfg), parts)
    except (C.ConfigError, KeyError, ValueError, TypeError, AttributeError, ImportError):
        return MISSING


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _same(a: Any, b: Any) -> bool:
    """Equal values (1 == 1.0 for numbers, NaN == NaN, lists element-wise; True != 1)."""
    if _is_number(a) and _is_number(b):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# ---- configs ----------------------------------------------------------------------------------------
def configs(cfg, params: str | Path | None = None):
    """(paper config, embedded-default config or None) for a loaded config of any profile.

    The paper config is `cfg` itself under profile=paper, else the embedded defaults with `profiles.paper`
    overlaid (as load_config does). The defaults are `cfg` when it runs the embedded profile, else reloaded
    from `params` (default ./params.yaml, when it exists) with profile=embedded.
    """
    from omegaconf import OmegaConf

    from g2d import config as C

    profile = (cfg.profiles or {}).get(PROFILE)
    if not profile:
        return None, None
    defaults = cfg if cfg.profile == "embedded" and not (cfg.profiles or {}).get("embedded") else None
    if defaults is None:
        path = Path(params) if params is not None else Path("params.yaml")
        if path.is_file():
            try:
                defaults = C.load_config(["profile=embedded"], path)
            except C.ConfigError:
                defaults = None
    if cfg.profile == PROFILE:
        return cfg, defaults
    base = defaults if defaults is not None else cfg
    merged = OmegaConf.merge(OmegaConf.create(C.to_dict(base)), OmegaConf.create(profile))
    merged.profile = PROFILE
    return C._validate(merged, C.Schema, f"profiles.{PROFILE}"), defaults


# ---- rendering --------------------------------------------------------------------------------------
def _cell(s: str) -> str:
    return str(s).replace("|", r"\|").replace("\n", " ")


def _row(key: str, value: Any, defaults, source: str) -> str:
    if defaults is None:
        dflt = "n/a"
    else:
        d = lookup(defaults, key)
        if d is MISSING:
            dflt = "not set"
        elif _same(d, value):
            dflt = "same"
        else:
            dflt = f"changed from `{fmt_value(d)}`"
    return f"| `{key}` | `{fmt_value(value)}` | {dflt} | {_cell(source)} |"


HEADER = ["| setting | value | embedded default | source |", "| --- | --- | --- | --- |"]


def _runs_by_dataset(paper) -> dict[str, list[tuple[str, str]]]:
    """base dataset -> [(method, dataset or view)] from the suite groups, in group order."""
    from g2d import registry

    out: dict[str, list[tuple[str, str]]] = {}
    for group in paper.suite.groups.values():
        for ds in group.datasets:
            base = registry.get_dataset(ds).view_of or ds
            for m in group.methods:
                if (m, ds) not in out.setdefault(base, []):
                    out[base].append((m, ds))
    return out


def _non_default_params(paper, method: str, dataset: str) -> str:
    from g2d import config as C
    from g2d import registry

    try:
        params = C.method_params(paper, method, dataset)
        got, code = C.to_dict(params), C.to_dict(registry.get_method(method).Params())
    except Exception as e:  # noqa: BLE001 - shown in the table, never hidden
        return f"(invalid: {e})"
    diff = [f"{k}={fmt_value(v)}" for k, v in got.items() if not _same(v, code.get(k, MISSING))]
    text = ", ".join(diff) if diff else "code defaults"
    if "smp_phase_epochs" in got:  # SMP: the phase lengths this (method, dataset) trains with
        from g2d.methods.smp import phase_bounds

        k = len(registry.get_dataset(dataset).spec.modality_names)
        try:
            bounds = phase_bounds(params, k, C.trainer_config(paper, dataset).epochs, f"methods.{method}")
            text += f"; SMP phases tau = {fmt_value([b - a for a, b in zip([0, *bounds], bounds)])} epochs"
        except ValueError as e:
            text += f"; (invalid SMP phases: {e})"
    return text


def render(paper, defaults) -> str:
    """Markdown of the paper profile's recipes (`paper`: a config under profile=paper)."""
    from g2d import registry

    profile = paper.profiles[PROFILE]
    vals = profile_leaves(profile)
    srcs = dict(profile.get("sources") or {})
    lines = [
        "# Paper-profile recipes (`profile=paper`)",
        "",
        "Generated from `profiles.paper` in `params.yaml` by `g2d report` (g2d/report/recipes.py); do not edit.",
        "Each value is applied by `profile=paper` and has its source: a paper section or table, an official "
        "repository file at a commit (`owner/repo:path@commit`), or \"not published: our choice, because ...\". "
        "*embedded default* is the value without a profile (`same`, or what the profile changes).",
        "Settings a dataset does not override come from the global table; parameters not listed keep the "
        "code defaults of `baselines/*.py` and `g2d/methods/*.py`.",
        "",
    ]
    problems = check_sources(profile)
    if problems:
        lines += ["**Missing or stale sources** (fix `profiles.paper.sources` in params.yaml):", ""]
        lines += [f"- {_cell(p)}" for p in problems] + [""]
    glob = {k: v for k, v in vals.items() if not k.startswith("datasets.")}
    lines += ["## Global settings", "", *HEADER]
    lines += [_row(k, v, defaults, srcs.get(k, "")) for k, v in glob.items()]
    lines.append("")
    runs = _runs_by_dataset(paper)
    in_profile = list(dict.fromkeys(k.split(".")[1] for k in vals if k.startswith("datasets.")))
    for ds in list(dict.fromkeys([*paper.suite.datasets, *in_profile])):
        title = TITLES.get(ds, ds)
        lines += [f"## {title} (`{ds}`)", ""]
        rows = {k: v for k, v in vals.items() if k.startswith(f"datasets.{ds}.")}
        if rows:
            lines += [*HEADER, *[_row(k, v, defaults, srcs.get(k, "")) for k, v in rows.items()], ""]
        else:
            lines += ["No dataset-specific settings: the global table applies.", ""]
        pairs = runs.get(ds, [])
        if pairs:
            mods = ", ".join(registry.get_dataset(ds).spec.modality_names)
            lines += [f"Runs on {title}: unimodal teachers ({mods}; same trainer and model settings, kept by "
                      "`trainer.select`) and the methods below. Parameters that differ from the code defaults, "
                      "per-dataset overrides merged in:", "",
                      "| method | dataset | parameters |", "| --- | --- | --- |"]
            lines += [f"| {m} | {d} | {_cell(_non_default_params(paper, m, d))} |" for m, d in pairs]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_recipes(cfg, out_dir: str | Path, params: str | Path | None = None) -> list[Path]:
    """Write <out_dir>/recipes.md (nothing when params.yaml has no paper profile); returns the paths written."""
    from g2d import config as C
    from g2d.data.prepared import atomic_write_text

    try:
        paper, defaults = configs(cfg, params)
    except C.ConfigError as e:  # the report tables do not depend on it; tests/unit/test_recipes.py guards it
        print(f"[g2d] warning: recipes.md not written: profiles.{PROFILE} does not validate: {e}", file=sys.stderr)
        return []
    if paper is None:
        return []
    path = Path(out_dir) / "recipes.md"
    atomic_write_text(path, render(paper, defaults))
    return [path]


def main(argv: list[str] | None = None) -> None:
    from g2d import config as C

    args = list(sys.argv[1:] if argv is None else argv)
    params = Path(args[0]) if args else Path("params.yaml")
    out = Path(args[1]) if len(args) > 1 else Path("reports/recipes.md")
    paper = C.load_config([f"profile={PROFILE}"], params)
    defaults = C.load_config(["profile=embedded"], params)
    from g2d.data.prepared import atomic_write_text

    atomic_write_text(out, render(paper, defaults))
    print(f"[g2d] wrote {out}")


if __name__ == "__main__":
    main()
