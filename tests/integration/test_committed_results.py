"""Committed results = HEAD (issue 11): the committed dvc.lock, data/code fingerprints, run summaries and
tables must be what the committed code and params produce, so a fresh clone's `dvc repro` has nothing to do."""
from g2d.freshness import stale


def test_committed_results_match_the_code_and_params():
    lines = stale()
    assert not lines, ("the committed results are not what this code and params.yaml produce:\n  "
                       + "\n  ".join(lines)
                       + "\nrun `dvc repro` and commit dvc.lock, data/code/ and reports/ with the change")


def test_staleness_ignores_absent_untracked_data_only(monkeypatch, tmp_path):
    """What a fresh clone lacks (data/prepared, data/runs) is not staleness; a changed param or file is."""
    import json
    import subprocess

    from g2d import freshness

    status = {"codehash": ["always changed"],
              "prepare@cremad": [{"changed outs": {"data/prepared/cremad": "deleted"}}],
              "main@joint": [{"changed deps": {"data/runs/teachers": "deleted", "data/code/joint.txt": "modified"}},
                             {"changed outs": {"data/runs/main/joint": "not in cache"}}],
              "report": [{"changed deps": {"g2d/report": "modified"}}],
              "aggregate": [{"changed deps": {"params.yaml": {"trainer.select": "modified"}}}]}
    done = subprocess.CompletedProcess([], 0, stdout=json.dumps(status), stderr="")
    monkeypatch.setattr(freshness.subprocess, "run", lambda *a, **k: done)
    assert freshness.dvc_changes(tmp_path) == {"report": ["g2d/report modified"],
                                               "aggregate": ["param trainer.select modified"]}
