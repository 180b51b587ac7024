"""The README and the `--help` texts cannot drift from the code.

- every shell command of a ```bash block of README.md is classified here: it either runs on a copy of the
  CI-profile project (the `ci_project` fixture, reproduced once per session) and must exit 0, or it is in
  SYNTAX_ONLY with the reason it cannot run in a test, and is then only checked by `bash -n`;
- `g2d --help` names every subcommand, and every `g2d <cmd> --help` exits 0;
- every params key the README names in backticks (`trainer.select`, `profile=ci`, `datasets.cremad.augment`,
  `workers` in `params.yaml`) exists in params.yaml, or is one of the documented patterns below.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from g2d.cli import main as g2d_main
from tests.pipeline_project import ROOT, run

README = (ROOT / "README.md").read_text()
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
PARAMS_TEXT = (ROOT / "params.yaml").read_text()

# command (as written in the README, comments stripped) -> why a test does not run it
SYNTAX_ONLY = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]' && dvc repro":
        "creates a venv, installs from the package index and runs the whole embedded suite (~15 min)",
    ". .venv/bin/activate && python -m pytest -m \"not slow\"":
        "the test suite itself (this test is part of it)",
}
# CPU-only install: same reason as the default install (network, minutes); matched by prefix
SYNTAX_ONLY_PREFIX = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch":
        "creates a venv and installs from PyTorch's CPU wheel index (network, minutes)",
    "dvc exp ": "runs or compares experiments (retrains stages); exercised by tests/integration/test_dvc_ux.py",
    "dvc plots ": "exercised by tests/integration/test_dvc_ux.py (offline template, titles)",
    "dvc metrics ": "exercised by tests/integration/test_dvc_ux.py (metrics files)",
    "git checkout ": "restores the workspace's params.yaml; a git operation on the repository itself",
    "g2d train method=g2d dataset=cremad trainer.device=cuda": "needs a CUDA GPU (tests/unit/test_gpu.py, -m gpu)",
    "CUDA_VISIBLE_DEVICES=": "needs CUDA GPUs; the pool is tested with a fake GPU list (tests/unit/test_fast_path.py)",
    "python benchmarks/gpu_throughput.py --device cpu --tiny": "exercised by tests/unit/test_gpu_benchmark.py",
    "bash benchmarks/gpu_check.sh": "needs a CUDA GPU (about 8 minutes)",
}
# what a runnable command may start with: the rest (another program) must be classified above first
RUNNABLE = re.compile(r"(g2d|dvc repro|dvc status|dvc dag|python -m g2d)\b")
# a README command trains for the epochs it names; the test trains one epoch
FAST = [(re.compile(r"trainer\.epochs=\d+"), "trainer.epochs=1")]


def readme_commands() -> list[str]:
    """Every command line of the ```bash blocks (continuation lines joined, trailing comments dropped)."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line, comments=True)  # fails on unbalanced quotes: a syntax error
            # keep the original quoting: cut at the comment shlex found
            text = line
            if "#" in line:
                for i in [m.start() for m in re.finditer(r"\s#", line)]:
                    if shlex.split(line[:i], comments=True) == words:
                        text = line[:i]
                        break
            cmds.append(" ".join(text.split()))
    return cmds


COMMANDS = readme_commands()


def _syntax_reason(cmd: str) -> str | None:
    if cmd in SYNTAX_ONLY:
        return SYNTAX_ONLY[cmd]
    for prefix, why in SYNTAX_ONLY_PREFIX.items():
        if cmd.startswith(prefix):
            return why
    return None


def test_readme_has_commands_and_every_one_is_classified():
    assert len(COMMANDS) >= 5, COMMANDS
    for cmd in COMMANDS:
        assert _syntax_reason(cmd) or RUNNABLE.match(cmd), (
            f"README command {cmd!r} is neither runnable here (g2d / dvc repro / dvc status) nor listed in "
            "tests/test_docs.py SYNTAX_ONLY with a reason")
    stale = [c for c in SYNTAX_ONLY if c not in COMMANDS]
    assert not stale, f"SYNTAX_ONLY lists commands the README no longer shows: {stale}"


@pytest.mark.parametrize("cmd", COMMANDS)
def test_readme_command_is_valid_bash(cmd):
    res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd!r}: {res.stderr}"


@pytest.fixture(scope="module")
def docs_project(ci_project, tmp_path_factory):
    """A copy of the reproduced CI project: the README's commands must not change the shared one."""
    dest = tmp_path_factory.mktemp("docs") / "proj"
    shutil.copytree(ci_project, dest, symlinks=True)
    return dest


RUN = [c for c in COMMANDS if not _syntax_reason(c)]


@pytest.mark.parametrize("cmd", RUN)
def test_readme_command_runs_on_the_ci_project(cmd, docs_project):
    fast = cmd
    for pat, repl in FAST:
        fast = pat.sub(repl, fast)
    res = run(["bash", "-c", fast], docs_project, check=False)
    assert res.returncode == 0, f"README command {cmd!r} (run as {fast!r}) failed ({res.returncode}):\n" \
                                f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}"


def test_compare_runs_on_the_ci_project(docs_project):
    """`g2d compare` (README: Adding a method) on the CI suite: Holm beside the raw p, the seeds it rests on, and
    the few-seeds caution only below MIN_SEEDS (tests/unit/test_report.py covers the caution itself)."""
    import yaml

    from g2d.report.compare import MIN_SEEDS

    res = run([sys.executable, "-m", "g2d.cli", "compare", "g2d"], docs_project, check=False)
    assert res.returncode == 0, res.stderr
    text = (docs_project / "reports/compare/g2d.md").read_text()
    seeds = len(yaml.safe_load((docs_project / "params.yaml").read_text())["suite"]["seeds"])
    assert "| p (Holm) | p (raw) |" in text and f"n: paired seeds ({seeds} here)" in text
    assert ("Few seeds" in text) == (seeds < MIN_SEEDS)


# ---- --help ---------------------------------------------------------------------------------------------

def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        g2d_main(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0, f"g2d {' '.join(argv)} exited {e.value.code}"
    return out


def _subcommands(capsys) -> tuple[list[str], str]:
    out = _help(["--help"], capsys)
    names = re.search(r"\{([a-z,]+)\}", out).group(1).split(",")
    return names, out


def test_top_help_names_every_subcommand(capsys):
    names, out = _subcommands(capsys)
    assert {"list", "fetch", "prepare", "train", "teacher", "verify", "codehash", "aggregate", "report",
            "calibrate", "compare"} <= set(names)
    description = out.split("\n\n")[1]  # the line under the usage
    missing = [n for n in names if not re.search(rf"\b{n}\b", description)]
    assert not missing, f"`g2d --help` description omits {missing}: {description!r}"
    for n in names:
        assert re.search(rf"^    {n}\s+\S", out, flags=re.M), f"`g2d --help` has no help line for {n}"


def test_every_subcommand_help_exits_0(capsys):
    names, _ = _subcommands(capsys)
    for n in names:
        out = _help([n, "--help"], capsys)
        assert f"usage: g2d {n}" in out
        assert "DESIGN.md" not in out, f"g2d {n} --help cites a file that is not in the repository"
        for path in re.findall(r"\b((?:reports|g2d|tests)/[\w./-]+\.(?:md|py|yaml))\b", out):
            assert (ROOT / path).exists(), f"g2d {n} --help cites {path}, which does not exist"


def test_train_help_shows_how_to_pick_the_run(capsys):
    out = _help(["train", "--help"], capsys)
    assert "method=" in out and "dataset=" in out and "seed=" in out


@pytest.mark.parametrize("argv", [["train", "--force", "trainer.bogus=1"],
                                  ["train", "trainer.bogus=1", "--force"],
                                  ["teacher", "--all-seeds", "cremad", "--modality", "audio", "trainer.bogus=1"]])
def test_overrides_are_accepted_after_flags(argv, capsys):
    """The override reaches the config (and is rejected there by name), not argparse's 'unrecognized'."""
    assert g2d_main(["--params", str(ROOT / "params.yaml"), *argv]) == 2
    err = capsys.readouterr().err
    assert "trainer.bogus" in err and "unrecognized" not in err


def test_unknown_flag_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        g2d_main(["list", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


# ---- params keys named by the README --------------------------------------------------------------------

FILE_SUFFIX = r"\.(pt|json|csv|md|py|ya?ml|txt|png|gz|pkl|html|tex|npy|sha256)$"


def _spans() -> list[str]:
    return re.findall(r"`([^`\n]+)`", README)


def _named_keys() -> set[str]:
    """Dotted keys, `key=value` / `key: value` spans and `x` in `params.yaml` whose first part is a
    top-level key of params.yaml (other dotted names, e.g. `metrics.json`, are not params keys)."""
    top = set(PARAMS)
    keys = set()
    for s in _spans():
        m = re.fullmatch(r"([A-Za-z_][\w+<>|*-]*(?:\.[\w+<>|*-]+)*)(?:\s*[=:]\s*\S.*)?", s)
        if m and re.search(FILE_SUFFIX, m.group(1)):  # `model.pt`, `metrics.json`: files, not keys
            continue
        if m and m.group(1).split(".")[0] in top:
            keys.add(m.group(1))
    for k in re.findall(r"`([\w.+<>-]+)` in `params\.yaml`", README):
        keys.add(k)
    return keys


def _documented_option(parts: list[str]) -> bool:
    """`datasets.<d>.real.<opt>`: fetch/prepare options of g2d/data/raw/<d>.py that params.yaml lists (in
    the `real:` mapping or in its comment) without giving them a value."""
    if len(parts) == 4 and parts[0] == "datasets" and parts[2] == "real":
        line = re.search(rf"^  {re.escape(parts[1])}:\n(?:    .*\n)*?    real:(.*)$", PARAMS_TEXT, flags=re.M)
        return bool(line and re.search(rf"\b{re.escape(parts[3])}\b", line.group(1)))
    return False


def _exists(key: str, node=None) -> bool:
    root, node = node is None, PARAMS if node is None else node
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            return False
        rest = ".".join(parts[i + 1:])
        if re.fullmatch(r"<\w+>|\*", part):  # a pattern: any child
            return bool(node) and (not rest or any(_exists(rest, child) for child in node.values()))
        if "|" in part:  # `a|b`: each alternative
            return all(_exists(".".join(filter(None, [alt, rest])), node) for alt in part.split("|"))
        if part not in node:
            return root and _documented_option(parts)
        node = node[part]
    return True


def test_readme_names_only_existing_params_keys():
    keys = _named_keys()
    assert {"trainer.select", "workers", "profile", "suite.groups.main.methods"} <= keys, keys
    missing = sorted(k for k in keys if not _exists(k))
    assert not missing, f"README names params keys that params.yaml does not have: {missing}"


def test_key_check_catches_a_wrong_key():
    assert not _exists("suite.methods") and not _exists("trainer.selekt") and not _exists("datasets.cremad.real.nope")
    assert _exists("datasets.<name>.real") and _exists("datasets.cremad.real.clone")


def test_readme_g2d_commands_name_real_subcommands(capsys):
    names, _ = _subcommands(capsys)
    used = {m for s in _spans() for m in re.findall(r"^g2d ([a-z]+)", s)}
    used |= {m for c in COMMANDS for m in re.findall(r"(?:^|&& )g2d ([a-z]+)", c)}
    assert used - set(names) == set(), f"README uses unknown g2d subcommands {sorted(used - set(names))}"
