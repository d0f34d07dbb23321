"""Config composition, the grid, and bad input: every bad invocation fails fast, names the field,
and leaves nothing behind (no results dir, no MLflow experiment or run)."""
from __future__ import annotations

import dataclasses
import importlib
import math
import socket
import subprocess
import sys

import mlflow
import pytest
from hydra import compose, initialize_config_dir

from services import free_port, run_sweep, sweep_env
from sweep import grid, schema
from sweep.cli import CONF_DIR

schema.register()


def _expand(experiment: str, overrides: list[str] = (), cli_values: set = frozenset()):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", [f"+experiment={experiment}", *overrides])
        trials = grid.expand(cfg, lambda ch: compose("config", [f"+experiment={experiment}", *overrides,
                                                               *(f"{g}={v}" for g, v in ch.items())]),
                             set(cli_values), set())
    return cfg, trials


def test_mnist_gain_grid_zips_damping_with_gain_for_ngd_d_only():
    cfg, trials = _expand("mnist_gain")
    seeds = list(cfg.sweep.seeds)
    assert seeds
    assert len(trials) == 4 * 4 * len(seeds)
    damping = {(t.optimizer, t.gain): t.config["optimizer"]["damping"] for t in trials}
    assert {g: damping["ngd_d", g] for g in (1.0, 1e-2, 1e-4, 1e-6)} == {1.0: 1e-3, 1e-2: 1e-3, 1e-4: 1e-6, 1e-6: 1e-7}
    assert all(damping[o, g] == 0.0 for o in ("sgd", "sqrt_ngd_d", "sqrt_ngd") for g in (1.0, 1e-2, 1e-4, 1e-6))
    lr = {(t.optimizer, t.gain): t.config["optimizer"]["lr"] for t in trials}   # S.I.3: NGD-d's lr scales too
    assert {g: lr["ngd_d", g] for g in (1.0, 1e-2, 1e-4, 1e-6)} == {1.0: 0.03, 1e-2: 0.03, 1e-4: 3e-5, 1e-6: 3e-6}
    assert {lr["sqrt_ngd_d", g] for g in (1.0, 1e-2, 1e-4, 1e-6)} == {0.1}     # sqrtNGD-d: one lr
    by_name = {t.optimizer: t.config["optimizer"] for t in trials}
    assert (by_name["sqrt_ngd"]["q"], by_name["sqrt_ngd"]["structure"]) == (2.0, "full")
    assert (by_name["ngd_d"]["q"], by_name["ngd_d"]["structure"]) == (1.0, "block")
    assert {t.variant for t in trials} == {"sgd", "ngd_d", "sqrt_ngd_d", "sqrt_ngd"}
    assert all(t.config["trainer"]["name"] == "mnist_mlp" for t in trials)
    assert len({t.key for t in trials}) == len(trials)


def test_teacher_student_and_fractional_q_grids():
    _, ts = _expand("teacher_student")
    assert len(ts) == 5 * 5
    assert all(t.config["trainer"]["converge_tol"] == 1e-3 for t in ts)       # like-for-like: run to convergence
    ngd = [t.config["optimizer"] for t in ts if t.optimizer in ("ngd", "ngd_d")]
    assert ngd and all(o["damping"] == 1e-5 and o["clip"] is not None for o in ngd)
    assert {t.config["trainer"]["steps"] for t in ts if t.optimizer == "sgd"} == {400_000}
    _, nw = _expand("teacher_student_nonwhite")
    assert len(nw) == 25 and all(not t.config["trainer"]["whiten"] and t.config["trainer"]["input_cov_cond"] == 100
                                 for t in nw)
    _, fq = _expand("fractional_q")
    opts = {(t.config["optimizer"]["structure"], t.config["optimizer"]["q"]): t.config["optimizer"] for t in fq}
    assert sorted(opts) == sorted((s, q) for s in ("full", "block") for q in (1, 1.5, 2, 3, 4, math.inf))
    for (_, q), o in opts.items():   # undamped and unclipped wherever stable; the NGD safeguards at q = 1 only
        assert (o["damping"], o["clip"]) == ((1e-5, 0.1) if q == 1 else (0.0, None)), (q, o)
    _, fd = _expand("fractional_q_damped")
    qs = sorted({(t.config["optimizer"]["structure"], t.config["optimizer"]["q"]) for t in fd})
    assert qs == sorted((s, q) for s in ("full", "block") for q in (1, 1.5, 2, 3, 4, 8, math.inf))
    assert all((t.config["optimizer"]["damping"], t.config["optimizer"]["clip"]) == (1e-5, 0.1) for t in fd)
    assert {t.variant for t in fd} >= {"qngd q=1.5", "qngd_d q=inf"}


def test_command_line_override_wins_and_identical_points_collapse():
    _, trials = _expand("smoke", ["trainer.gain=0.5", "optimizer.lr=0.3"], {"trainer.gain", "optimizer.lr"})
    assert {t.gain for t in trials} == {0.5}
    assert {t.config["optimizer"]["lr"] for t in trials} == {0.3}
    assert len(trials) == 2 * 2  # 2 optimizers x 2 seeds: the gain axis collapsed


def test_trial_key_is_a_stable_hash_of_the_resolved_config():
    _, a = _expand("smoke")
    _, b = _expand("smoke")
    assert [t.key for t in a] == [t.key for t in b]
    changed = dict(a[0].config, seed=99)
    assert grid.trial_key(changed) != a[0].key
    assert grid.flatten_params(a[0].config)["optimizer.lr"] == str(a[0].config["optimizer"]["lr"])


@pytest.mark.parametrize("module,name,schema_cls", [
    ("trainers.linear_teacher", "LinearTeacherConfig", schema.LinearTeacherConf),
    ("trainers.mnist_mlp", "MnistMlpConfig", schema.MnistMlpConf),
    ("trainers.mnist_mlp", "DataConfig", schema.DataConf),
    ("trainers", "OptimizerConfig", schema.OptimizerConf)])  # what the trainers use (from trainers.config)
def test_schema_mirrors_the_trainer_dataclasses(module, name, schema_cls):
    """The sweep's schemas and the trainers' dataclasses name the same fields (Contract 1)."""
    trainer_cls = getattr(importlib.import_module(module), name)
    assert {f.name for f in dataclasses.fields(schema_cls)} == {f.name for f in dataclasses.fields(trainer_cls)}


def _closed_port() -> int:
    port = free_port()
    with socket.socket() as s:  # nothing listens there now
        assert s.connect_ex(("127.0.0.1", port)) != 0
    return port


BAD = [  # (overrides, text the message must contain); many more, in one process: tests/test_sweep_validate.py
    (["trainer.widht=3"], "trainer.widht is not a field"),          # unknown key (Hydra)
    (["+trainer.step=10"], "did you mean trainer.steps?"),           # unknown key added with + (trainer rules)
    (["trainer.steps=many"], "trainer.steps"),                       # wrong type
    (["optimizer=qngd", "optimizer.q=0.5"], "optimizer.q=0.5 must be >= 1"),
    (["optimizer=adam"], "sqrt_ngd_d"),                              # lists the options
    (["resources.gpu=1"], "resources.gpu=1 per trial does not fit"),
    (["tracking.uri=http://127.0.0.1:{closed}"], "tracking.uri"),
    (["cluster.address=127.0.0.1:{closed}"], "cluster.address"),
    (["+experiment=nope"], "nope"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][-1][:40] for b in BAD])
def test_bad_invocation_fails_fast_and_leaves_nothing(overrides, message, tmp_path, mlflow_server, experiment_name):
    closed = _closed_port()
    args = [o.replace("{closed}", str(closed)) for o in overrides]
    base = [] if any(a.startswith("+experiment=") for a in args) else ["+experiment=smoke"]
    tracking = [] if any(a.startswith("tracking.uri") for a in args) else [f"tracking.uri={mlflow_server.uri}"]
    proc, seconds = run_sweep([*base, *args, *tracking, f"tracking.experiment={experiment_name}"], cwd=tmp_path,
                              timeout=60, env=sweep_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert message in out, out
    assert seconds < 15, f"took {seconds:.1f}s"
    assert "Traceback" not in out, out
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, out
    assert list(tmp_path.iterdir()) == [], "a bad config must leave nothing behind"
    mlflow.set_tracking_uri(mlflow_server.uri)
    assert mlflow.get_experiment_by_name(experiment_name) is None


def test_bad_invocation_imports_no_torch_ray_or_mlflow(tmp_path):
    """The trainers' rules run on the driver from torch-free trainers.config: a bad invocation pays for
    Hydra and the rules only (bench/bench_plan.py measures it)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sweep", "+experiment=smoke", "optimizer.lr=-1"],
                          cwd=tmp_path, env=sweep_env(), capture_output=True, text=True, timeout=60)
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:")]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: optimizer.lr=-1"), proc.stderr[-2000:]
    modules = {ln.split("|")[-1].strip().split(".")[0] for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    assert {"hydra", "trainers", "omegaconf"} <= modules, "importtime lists what was imported"
    assert modules.isdisjoint({"torch", "ray", "mlflow", "numpy"}), sorted(modules & {"torch", "ray", "mlflow", "numpy"})


def test_help_and_cfg_job(tmp_path):
    proc, _ = run_sweep(["--help"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and "+experiment=NAME" in proc.stdout and "optimizer: " in proc.stdout
    proc, _ = run_sweep(["+experiment=mnist_gain", "--cfg", "job"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and "name: mnist_mlp" in proc.stdout
    proc, _ = run_sweep(["+experiment=mnist_gain", "dry_run=true"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and "32 trials" in proc.stdout, proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("trainer,module,name", [("linear_teacher", "trainers.linear_teacher", "LinearTeacherConfig"),
                                                 ("mnist_mlp", "trainers.mnist_mlp", "MnistMlpConfig")])
def test_trainer_yaml_defaults_equal_the_trainer_dataclass_defaults(trainer, module, name):
    """conf/trainer/*.yaml restates the trainers' defaults; a trainer changing one must not go unnoticed."""
    from omegaconf import OmegaConf
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", [f"trainer={trainer}"])
    ours = OmegaConf.to_container(cfg.trainer, resolve=True)
    theirs = dataclasses.asdict(getattr(importlib.import_module(module), name)())
    assert ours == theirs
