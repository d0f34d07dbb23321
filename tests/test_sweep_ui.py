"""The researcher's view against real services: `python -m sweep` on a real `mlflow server`, its runs
read back through MLflow's API, the link it prints opened in a real headless Chromium, a grown grid
that reruns only the new trials, and the report re-rendered without Ray."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import browser
from services import REPO, run_sweep, sweep_env, sweep_runs

ARTIFACTS = Path(os.environ.get("SWEEP_TEST_ARTIFACTS", REPO / "test-artifacts"))


def _args(server, experiment, tmp_path, *extra):
    return ["+experiment=smoke", f"tracking.uri={server.uri}", f"tracking.experiment={experiment}",
            f"results_dir={tmp_path / 'results'}", *extra]


@pytest.fixture(scope="module")
def experiment(mlflow_server, tmp_path_factory):
    """One smoke sweep with a single seed (4 trials); the tests below grow and re-read it."""
    name = f"ui-{os.getpid()}"
    tmp = tmp_path_factory.mktemp("ui")
    proc, _ = run_sweep(_args(mlflow_server, name, tmp, "sweep.seeds=[0]"), tmp, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {"name": name, "tmp": tmp, "out": proc.stdout}


def _git(*args):
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_runs_carry_provenance_names_and_the_summary(mlflow_server, experiment):
    parents, children = sweep_runs(mlflow_server.uri, experiment["name"])
    assert len(parents) == 1 and len(children) == 4
    expected = {"mlflow.source.git.commit": _git("rev-parse", "HEAD"), "mlflow.source.type": "LOCAL",
                "sweep.git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
                "sweep.host": socket.gethostname(),
                **{f"version.{p}": metadata.version(p) for p in ("torch", "ray", "mlflow", "hydra-core", "numpy")}}
    for runs in (parents, children):
        for tag, value in expected.items():
            assert set(runs[f"tags.{tag}"]) == {value}, tag
        assert runs["tags.sweep.command"].str.contains("-m sweep +experiment=smoke", regex=False).all()
        assert runs["tags.mlflow.source.name"].str.startswith("sweep +experiment=smoke").all()
    assert set(children["tags.mlflow.runName"]) == {"sgd g1e-1 s0", "sgd g1e-2 s0", "sqrt_ngd_d g1e-1 s0",
                                                     "sqrt_ngd_d g1e-2 s0"}
    # the parent carries the summary as its description and the headline numbers as metrics
    parent = parents.iloc[0]
    note = parent["tags.mlflow.note.content"]
    assert "| variant | gain 1e-1 | gain 1e-2 |" in note
    c = children.set_index("tags.mlflow.runName")
    value = c.loc["sqrt_ngd_d g1e-2 s0", "metrics.final_test_loss"]
    assert parent["metrics.final_test_loss/sqrt_ngd_d/g1e-2"] == pytest.approx(value, rel=1e-12)
    row = next(line for line in note.splitlines() if line.startswith("| sqrt_ngd_d | "))
    assert f"{value:.3f}±0.000" in row or f"{value:.4f}±0.0000" in row or f"{value:.2f}±0.00" in row
    assert float(parent["tags.sweep.run_seconds"]) > 0 and parent["tags.sweep.invocations"] == "1"


@pytest.mark.skipif(not browser.available(), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_the_printed_link_opens_the_runs_table(mlflow_server, experiment, tmp_path):
    link = re.search(r"Open the runs table: (http\S+)", experiment["out"]).group(1)
    assert "workflowType=machine_learning" in link and ":5000/" not in link
    names = ["sgd g1e-1 s0", "sgd g1e-2 s0", "sqrt_ngd_d g1e-1 s0", "sqrt_ngd_d g1e-2 s0"]
    with browser.Browser(tmp_path / "chrome") as b:
        b.open(link)
        text = b.wait_for_text(["Run Name", *names], timeout=180)
        shot = b.screenshot(ARTIFACTS / "runs_table.png")
        # model-training mode, not the GenAI traces page; the rows list optimizer (variant) and gain
        assert "Model training" in text
        order = [text.index(n) for n in names]
        assert order == sorted(order), "sorted by run name: variant, then gain"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")


def test_a_grown_grid_reruns_only_the_new_trials(mlflow_server, experiment):
    tmp, name = experiment["tmp"], experiment["name"]
    args = _args(mlflow_server, name, tmp, "sweep.seeds=[0,1]")
    proc, _ = run_sweep(args, tmp, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert re.search(r"4 trials already finished, 4 to run", proc.stdout.replace("\n", " "))
    parents, children = sweep_runs(mlflow_server.uri, name)
    assert len(parents) == 2 and len(children) == 8, "only seed 1 ran again"
    assert children["tags.trial.key"].nunique() == 8
    new = parents.sort_values("start_time").iloc[-1]
    summary = pd.read_csv(tmp / "results" / "reports" / new["tags.sweep.id"] / "summary.csv")
    assert set(summary["trials"]) == {2}, "the new sweep's report counts the reused seed-0 trials"
    # the same command again: nothing to run, and the parent's timings are not overwritten with 0
    proc2, _ = run_sweep(args, tmp, timeout=300)
    assert proc2.returncode == 0 and "8 trials already finished, 0 to run" in proc2.stdout.replace("\n", " ")
    run = MlflowClient(mlflow_server.uri).get_run(new["run_id"])
    assert run.data.tags["sweep.run_seconds"] == new["tags.sweep.run_seconds"] and float(new["tags.sweep.run_seconds"]) > 0
    assert run.data.tags["sweep.invocations"] == "2" and run.data.tags["sweep.last_run_seconds"] == "0.0"


def test_report_rerenders_without_ray(mlflow_server, experiment, tmp_path):
    fake = tmp_path / "no-ray"  # a `ray` that cannot be imported: the report must not need it
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError('the report must not import ray')\n")
    env = sweep_env(PYTHONPATH=f"{fake}{os.pathsep}{REPO}")
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "sweep", "report", "--tracking-uri", mlflow_server.uri,
                           "--experiment", experiment["name"], "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert {p.name for p in out.iterdir()} >= {"summary.csv", "learning_curves.png", "modes.png"}
    summary = pd.read_csv(out / "summary.csv")
    _, children = sweep_runs(mlflow_server.uri, experiment["name"])
    c = children[(children["tags.variant"] == "sgd") & (children["tags.gain"] == "0.1")]["metrics.final_test_loss"]
    row = summary[(summary["variant"] == "sgd") & (summary["gain"] == 0.1)].iloc[0]
    assert row["final_test_loss_mean"] == pytest.approx(c.mean(), rel=1e-12)
    lines = proc.stdout.splitlines()
    assert any(line.lstrip().startswith("sqrt_ngd_d ") for line in lines)
    table = lines[lines.index(next(x for x in lines if x.startswith("final test loss"))):]
    assert max(len(x) for x in table[:12]) <= 80
