"""The deep linear teacher–student trainer (paper §6): the task, the records, determinism, divergence,
and the paper's claims on conservation-law drift (§3.1, §5, Fig 5C) and early stopping (Fig 4C).

Thresholds come from measurements of this task (default config, seeds 0-2, listed next to each
assertion) and are set with a margin of about 2x on the side the claim does not care about."""

from __future__ import annotations

import math

import pytest
import torch

from trainers import run_trial
from trainers.diagnostics import conservation_linear
from trainers.linear_teacher import LinearTeacherConfig, init_student, make_task

LR = 0.05

def ngd_opts(lr):
    """The paper's corrections for NGD and NGD-d (§6): Levenberg–Marquardt damping 1e-5 and
    update-speed clipping; the clip caps ||lr * D|| at 2 * lr (a direction norm of 2)."""
    return {"damping": 1e-5, "clip": 2 * lr}


def trial(optimizer: dict, seed=0, **trainer):
    return list(run_trial({"seed": seed, "device": "cpu", "optimizer": optimizer,
                           "trainer": {"name": "linear_teacher", **trainer}}))


# ------------------------------------------------------------------------------------------ the task
def test_task_whitened_rank_and_sizes():
    cfg = LinearTeacherConfig()
    task = make_task(cfg, torch.Generator().manual_seed(0))
    n, p = cfg.width, cfg.train_samples
    assert task.x_train.shape == (n, p) and task.y_train.shape == (n, p)
    assert task.x_test.shape == (n, cfg.test_samples) and cfg.test_samples >= 10 * n
    emp = task.x_train @ task.x_train.T / p
    torch.testing.assert_close(emp, torch.eye(n, dtype=emp.dtype), atol=1e-12, rtol=0)
    assert int(torch.linalg.matrix_rank(task.teacher)) == cfg.rank
    torch.testing.assert_close(torch.linalg.svdvals(task.teacher)[:cfg.rank],
                               torch.tensor(sorted(cfg.teacher_singular_values, reverse=True), dtype=emp.dtype))
    torch.testing.assert_close(task.y_test, task.teacher @ task.x_test)          # clean test targets
    noise = task.y_train - task.teacher @ task.x_train
    assert 0.5 * cfg.noise_std < float(noise.std()) < 1.5 * cfg.noise_std
    raw = make_task(LinearTeacherConfig(whiten=False), torch.Generator().manual_seed(0))
    assert float((raw.sigma_x - torch.eye(n, dtype=emp.dtype)).abs().max()) > 0.1   # not whitened


def test_student_init_gain_and_balance():
    gen = torch.Generator().manual_seed(0)
    ws = init_student(LinearTeacherConfig(init="orthogonal", gain=0.3), gen)
    for w in ws:
        torch.testing.assert_close(torch.linalg.svdvals(w), torch.full((16,), 0.3, dtype=w.dtype))
    ws = init_student(LinearTeacherConfig(balanced=True, gain=0.2), gen)
    assert max(float(c.abs().max()) for c in conservation_linear(ws)) < 1e-14
    ws = init_student(LinearTeacherConfig(), gen)  # gaussian, gain 0.1: entries N(0, gain^2 / N)
    assert float(torch.cat([w.flatten() for w in ws]).std()) == pytest.approx(0.1 / 4, rel=0.15)
    assert max(float(c.abs().max()) for c in conservation_linear(ws)) > 1e-3  # not balanced


@pytest.mark.parametrize("field,value,match", [
    ("rank", 17, "trainer.rank=17"),
    ("teacher_singular_values", [1.0, 2.0], "trainer.teacher_singular_values"),
    ("test_samples", 100, "trainer.test_samples=100 must be >= 10 \\* width"),
    ("train_samples", 8, "trainer.whiten=true needs train_samples >= width"),
    ("init", "xavier", "trainer.init='xavier'"),
    ("gain", 0.0, "trainer.gain=0.0"),
    ("eval_every", 0, "trainer.eval_every=0"),
    ("widht", 16, "unknown field trainer.widht"),
])
def test_bad_trainer_fields_fail_before_work(field, value, match):
    with pytest.raises(ValueError, match=match):
        run_trial({"optimizer": {"name": "sgd"}, "trainer": {"name": "linear_teacher", field: value}})


@pytest.mark.parametrize("opt,match", [
    ({"name": "adam"}, "optimizer.name='adam'"),
    ({"name": "ngd_d", "structure": "full"}, "optimizer.structure='full' contradicts"),
    ({"name": "sqrt_ngd", "q": 3}, "optimizer.q=3.0 contradicts.*qngd"),
    ({"name": "qngd", "q": 0.5}, "optimizer.q=0.5 must be >= 1"),
    ({"name": "sgd", "lr": -1}, "optimizer.lr=-1"),
    ({"name": "sgd", "momentum": 0.9}, "unknown field optimizer.momentum"),
])
def test_bad_optimizer_fields(opt, match):
    with pytest.raises(ValueError, match=match):
        run_trial({"optimizer": opt, "trainer": {"name": "linear_teacher"}})


def test_unknown_trainer_and_device():
    with pytest.raises(ValueError, match="trainer.name='cnn'"):
        run_trial({"trainer": {"name": "cnn"}})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'.*not available"):
            run_trial({"device": "cuda", "trainer": {"name": "linear_teacher"}})


# --------------------------------------------------------------------------------- records, determinism
def test_records_follow_the_contract_and_are_deterministic():
    cfg = dict(steps=200, eval_every=50, log_eval=True)
    recs = trial({"name": "sqrt_ngd_d", "lr": LR}, **cfg)
    evals, summary = recs[:-1], recs[-1]
    assert all(r["kind"] == "eval" for r in evals) and summary["kind"] == "summary"
    steps = [r["step"] for r in evals]
    assert steps[0] == 0 and steps[-1] == 200 and {1, 2, 50, 100, 150} <= set(steps) and steps == sorted(steps)
    names = {"train_loss", "test_loss", "weight_norm", "conservation_drift", "update_norm", "clipped_updates",
             "noise_mode", "norm_excess", "signal_mode.k1", "signal_mode.k2", "signal_mode.k3"}
    names |= {f"weight_norm.l{i}" for i in range(1, 5)} | {f"conservation_drift.l{i}" for i in range(1, 4)}
    assert set(evals[-1]["metrics"]) == names
    assert summary["status"] == "finished" and summary["step"] == 200 and summary["diverged_step"] is None
    assert set(summary["metrics"]) == {"early_stop_step", "early_stop_test_loss", "final_train_loss",
                                       "final_test_loss", "weight_norm_growth", "max_conservation_drift",
                                       "steps_per_second", "clipped_updates"}
    assert summary["metrics"]["final_train_loss"] < 0.1 * evals[0]["metrics"]["train_loss"]
    # signal before noise: by the end the strongest mode is learned (teacher s_1 = 3) and dominates noise
    last = evals[-1]["metrics"]
    assert last["signal_mode.k1"] == pytest.approx(3.0, abs=0.3) and last["noise_mode"] < last["signal_mode.k3"]
    again = trial({"name": "sqrt_ngd_d", "lr": LR}, **cfg)
    strip = lambda rs: [{**r, "metrics": {k: v for k, v in r["metrics"].items() if k != "steps_per_second"}}
                        for r in rs]  # noqa: E731
    assert strip(again) == strip(recs)
    assert strip(trial({"name": "sqrt_ngd_d", "lr": LR}, seed=1, **cfg)) != strip(recs)


def test_divergence_ends_the_trial_with_its_step():
    """NGD-d with no damping and no clipping from small weights: the block inverse makes the update
    explode; the trial must end 'diverged' with a step, never raise."""
    recs = trial({"name": "ngd_d", "lr": 1.0}, steps=200, eval_every=10)
    s = recs[-1]
    assert s["kind"] == "summary" and s["status"] == "diverged"
    assert isinstance(s["diverged_step"], int) and 0 < s["diverged_step"] <= 200 and s["reason"]
    assert all(r["kind"] == "eval" and r["step"] < s["diverged_step"] for r in recs[:-1])


# ------------------------------------------------------------------------------ the paper's claims
# Default task (N=16, d=4, rank 3, P=16, whitened, noise 0.3, gaussian init gain 0.1), lr 0.05 for all
# rules. log_eval samples the first steps densely: the full rules' drift peaks around t = lr*step = 0.25.
SEEDS = (0, 1, 2)
RULES = {  # name -> (optimizer fields, steps): each rule is trained until its train loss has converged
    "sgd": ({}, 10_000),            # SGD fits the noise modes last (time ~ 1/sigma^1.5): it needs the longest
    "sqrt_ngd": ({}, 600),
    "sqrt_ngd_d": ({}, 600),
    "ngd": (ngd_opts(LR), 600),
    "ngd_d": (ngd_opts(LR), 600),
}


@pytest.fixture(scope="module")
def runs():
    out = {}
    for name, (extra, steps) in RULES.items():
        for seed in SEEDS:
            recs = trial({"name": name, "lr": LR, **extra}, seed=seed, steps=steps, eval_every=20, log_eval=True)
            assert recs[-1]["status"] == "finished", (name, seed, recs[-1])
            out[name, seed] = recs
    return out


def _summary(runs, name):
    return [runs[name, s][-1]["metrics"] for s in SEEDS]


def _final(runs, name, key):
    return [runs[name, s][-2]["metrics"][key] for s in SEEDS]


def test_every_rule_fits_the_training_set(runs):
    for name in RULES:
        for m, first in zip(_summary(runs, name), (runs[name, s][0]["metrics"]["train_loss"] for s in SEEDS)):
            # measured: SGD 0.06-0.10 after 10k steps; the curvature rules < 1e-4 after 600 steps (from ~7.5)
            assert m["final_train_loss"] < (0.2 if name == "sgd" else 1e-3), (name, m)
            assert m["final_train_loss"] < 0.03 * first


def test_conservation_full_rules_small_block_rules_broken(runs):
    """§3.1 / Fig 5C: the full rules conserve c_i (drift only from the finite step), NGD-d breaks it most.
    Measured max_conservation_drift at lr 0.05 over seeds 0-2: SGD <= 1.3e-3, sqrtNGD <= ~1.7e-2,
    NGD <= ~7e-3; final drift: full rules <= 5.2e-4, sqrtNGD-d ~1.0e-2, NGD-d 7.5e-2 .. 9.4e-2."""
    for name in ("sgd", "sqrt_ngd", "ngd"):
        assert max(m["max_conservation_drift"] for m in _summary(runs, name)) < 0.035, name
        assert max(_final(runs, name, "conservation_drift")) < 2e-3, name
    ngd_d, sqrt_ngd_d = _final(runs, "ngd_d", "conservation_drift"), _final(runs, "sqrt_ngd_d", "conservation_drift")
    assert min(ngd_d) > 0.04                                     # large: a broken law, not a step-size effect
    assert all(a > 3 * b for a, b in zip(ngd_d, sqrt_ngd_d))    # measured ratio 7-9x per seed
    assert min(sqrt_ngd_d) > 5 * max(max(_final(runs, n, "conservation_drift")) for n in ("sgd", "sqrt_ngd", "ngd"))


def test_drift_shrinks_with_lr_for_full_rules_only():
    """Quarter the lr (4x the steps, same time horizon t = lr * steps = 5, seed 0). Measured
    max_conservation_drift, lr 0.05 -> 0.0125: SGD 8.2e-6 -> 2.0e-6, sqrtNGD 1.7e-2 -> 3.2e-3,
    NGD 7.2e-3 -> 1.6e-3 (first order in lr: ratio 4-5.4); sqrtNGD-d 4.0e-2 -> 3.8e-2 and
    NGD-d 8.9e-2 -> 7.9e-2 (ratio 1.04-1.12: the block rules break the law in continuous time)."""
    drift = {}
    for name in ("sgd", "sqrt_ngd", "ngd", "sqrt_ngd_d", "ngd_d"):
        for lr in (LR, LR / 4):
            extra = ngd_opts(lr) if name in ("ngd", "ngd_d") else {}
            recs = trial({"name": name, "lr": lr, **extra}, steps=round(5 / lr), eval_every=10, log_eval=True)
            drift[name, lr] = recs[-1]["metrics"]["max_conservation_drift"]
    for name in ("sgd", "sqrt_ngd", "ngd"):
        assert drift[name, LR] / drift[name, LR / 4] > 3.0, (name, drift)
    for name in ("sqrt_ngd_d", "ngd_d"):
        assert drift[name, LR] / drift[name, LR / 4] < 1.5, (name, drift)
    assert drift["ngd_d", LR / 4] > 2 * drift["sqrt_ngd_d", LR / 4] > 10 * drift["sqrt_ngd", LR / 4]


def test_early_stopping_benefit_fig4c(runs):
    """Fig 4C: SGD and sqrtNGD (and sqrtNGD-d) learn the signal before the noise, so early stopping
    helps; NGD and NGD-d learn all modes at once and gain little. Benefit = final - early-stop test loss.
    Measured (seeds 0, 1, 2): SGD 0.43 0.34 0.48; sqrtNGD 0.50 0.43 0.49; sqrtNGD-d 0.50 0.43 0.50;
    NGD 0.052 0.076 0.065; NGD-d 0.054 0.078 0.068. Asserted on the mean over seeds (per seed the margin
    to the 1/2 bound is also > 2x)."""
    def benefit(name):
        return [m["final_test_loss"] - m["early_stop_test_loss"] for m in _summary(runs, name)]

    mean = {name: sum(benefit(name)) / len(SEEDS) for name in RULES}
    for small in ("ngd", "ngd_d"):
        for large in ("sgd", "sqrt_ngd", "sqrt_ngd_d"):
            assert mean[small] < 0.5 * mean[large], mean
            assert all(s < 0.5 * l for s, l in zip(benefit(small), benefit(large))), (small, large)
    # where each rule stops early: the curvature rules in the first ~100 steps, SGD after 1000+
    assert min(m["early_stop_step"] for m in _summary(runs, "sgd")) > 1000

