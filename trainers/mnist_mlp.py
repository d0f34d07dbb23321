"""ReLU MLP on MNIST over initial gains (paper S.I.3, Fig S.I.2).

An MLP ``layers`` = [784, 300, 100, 30, 10] (Linear with bias, ReLU between), weights initialised as
orthogonal matrices times ``gain`` (so the initial map's singular values are ~gain^4 for 4 layers),
biases zero, trained with minibatches of ``batch_size`` by ``trainers.mlp_curvature.CurvaturePreconditioner``
(which rewrites ``.grad`` with the q-NGD direction; q = inf leaves the gradient) followed by
``trainers.curvature.clip_update`` and a stock ``torch.optim.SGD`` step. Float32 weights; the curvature
algebra runs in float64 inside the preconditioner.

Config (``trainer:``; defaults in :class:`MnistMlpConfig`, the one place they live)::

    name: mnist_mlp
    gain: 1.0                # orthogonal init times gain (paper: 1 ... 1e-6)
    steps: 1000              # minibatch steps (ignored when epochs is set)
    eval_every: 100          # evaluate every this many steps (plus step 0 and the last step)
    log_eval: false          # also evaluate at 20 log-spaced steps per decade
    max_weight_norm: 1.0e4   # sum_i ||W_i||_F above this ends the trial as diverged
    layers: [784, 300, 100, 30, 10]
    batch_size: 128
    epochs: null             # if set (may be fractional): steps = ceil(epochs * n_train / batch_size)
    loss: cross_entropy      # or mse: 0.5 * mean ||f(x) - onehot(y)||^2
    train_subset: null       # first n training examples (null = all 60,000)
    test_subset: null        # first n test examples (null = all 10,000)
    data: {name: mnist, root: null, cache_dir: null}   # see trainers.data (name: mnist | fashion_mnist)

Pixels are scaled to [0, 1] (x / 255), no other normalisation. Minibatches are drawn without replacement
from a fresh seeded permutation every epoch. ``train_loss`` is the loss on the first
min(10,000, n_train) training examples (a fixed set, so curves are comparable), ``test_loss`` and
``test_accuracy`` on the whole (sub)set of test examples. ``weight_norm`` counts the weight matrices;
``conservation_drift`` uses the per-neuron law of ``trainers.diagnostics.conservation_relu`` and divides
by the sum of squared weights *and* biases. ``update_norm`` is ||lr * direction|| of the last step.
``norm_excess`` (the weight-norm divergence, as for the linear teacher) = sum of squared weights and
hidden biases over its exact minimum across the per-neuron rescalings that leave the function unchanged
(``trainers.diagnostics.relu_norm_excess``; 1 = every hidden neuron balanced).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from trainers import flush_denormals, resolve_device
from trainers.config import DataConfig, MnistMlpConfig, OptimizerConfig, config_from_dict  # noqa: F401
from trainers import diagnostics as diag

__all__ = ["MnistMlpConfig", "DataConfig", "build_model", "run"]

TRAIN_EVAL_SAMPLES = 10_000
EVAL_CHUNK = 10_000


def build_model(layers: list[int], gain: float, gen: torch.Generator) -> nn.Sequential:
    """Linear/ReLU stack; weights orthogonal x gain (drawn from ``gen``), biases zero."""
    mods: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(layers[:-1], layers[1:])):
        lin = nn.Linear(n_in, n_out)
        with torch.no_grad():
            nn.init.orthogonal_(lin.weight, gain=gain, generator=gen)
            lin.bias.zero_()
        mods.append(lin)
        if i < len(layers) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def run(config: Mapping) -> Iterator[dict]:
    """Validate ``config`` and load the data now; return the generator of records (Contract 2)."""
    cfg = config_from_dict(MnistMlpConfig, config["trainer"], "trainer")
    opt = OptimizerConfig.from_dict(config.get("optimizer"))
    if opt.damping_form != "lm" and opt.damping > 0:
        raise ValueError(f"optimizer.damping_form={opt.damping_form!r} is implemented for the linear_teacher "
                         "trainer only; use damping_form: lm with mnist_mlp")
    device = resolve_device(config.get("device", "auto"))
    seed = int(config.get("seed", 0))
    from trainers.data import load_dataset

    data = load_dataset(cfg.data.name, cfg.data.root, cfg.data.cache_dir)
    return _train(cfg, opt, device, seed, data)


def _tensors(images, labels, n, device):
    n = len(labels) if n is None else n
    x = torch.from_numpy(images[:n].reshape(n, -1)).to(device=device, dtype=torch.float32) / 255.0
    return x, torch.from_numpy(labels[:n].astype("int64")).to(device)


def _train(cfg: MnistMlpConfig, opt: OptimizerConfig, device, seed, data) -> Iterator[dict]:
    with flush_denormals():
        yield from _steps(cfg, opt, device, seed, data)


def _steps(cfg: MnistMlpConfig, opt: OptimizerConfig, device, seed, data) -> Iterator[dict]:
    from trainers.curvature import clip_update
    from trainers.mlp_curvature import CurvaturePreconditioner

    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = _tensors(data.train_images, data.train_labels, cfg.train_subset, device)
    x_test, y_test = _tensors(data.test_images, data.test_labels, cfg.test_subset, device)
    n_train = len(y_train)
    steps = cfg.total_steps(n_train)
    model = build_model(list(cfg.layers), cfg.gain, gen).to(device)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    params = [p for m in linears for p in (m.weight, m.bias)]
    pre = CurvaturePreconditioner(model, q=opt.q, structure=opt.structure, damping=opt.damping,
                                  loss=cfg.loss, rtol=opt.rtol, curvature_every=opt.curvature_every,
                                  precision=opt.precision)
    sgd = torch.optim.SGD(params, lr=opt.lr)

    def targets(y):
        return F.one_hot(y, 10).to(torch.float32) if cfg.loss == "mse" else y

    @torch.no_grad()
    def evaluate(x, y):
        loss_sum, correct = 0.0, 0
        for i in range(0, len(y), EVAL_CHUNK):
            out, yy = model(x[i:i + EVAL_CHUNK]), y[i:i + EVAL_CHUNK]
            if cfg.loss == "cross_entropy":
                loss_sum += float(F.cross_entropy(out, yy, reduction="sum"))
            else:
                loss_sum += float(0.5 * (out - targets(yy)).square().sum())
            correct += int((out.argmax(1) == yy).sum())
        return loss_sum / len(y), correct / len(y)

    def weight_norm():
        return sum(float(torch.linalg.matrix_norm(m.weight.detach())) for m in linears)

    def conservation():
        return diag.conservation_relu([m.weight.detach() for m in linears], [m.bias.detach() for m in linears])

    schedule = diag.EvalSchedule(steps, cfg.eval_every, cfg.log_eval)
    tracker = diag.SummaryTracker()
    c_init = conservation()
    n_eval = min(TRAIN_EVAL_SAMPLES, n_train)
    clipped, update_norm = 0, 0.0
    order, cursor = torch.randperm(n_train, generator=gen), 0
    for step in range(steps + 1):
        if step in schedule:
            train_loss, _ = evaluate(x_train[:n_eval], y_train[:n_eval])
            test_loss, test_acc = evaluate(x_test, y_test)
            norms = diag.weight_norms([m.weight.detach() for m in linears])
            reason = diag.divergence_reason(train_loss, norms["weight_norm"], cfg.max_weight_norm)
            if reason:
                yield tracker.summary(step, clipped_updates=clipped, diverged_reason=reason)
                return
            squared = sum(float(p.detach().double().square().sum()) for p in params)
            metrics = {"train_loss": train_loss, "test_loss": test_loss, "test_accuracy": test_acc, **norms,
                       **diag.conservation_drift(conservation(), c_init, squared),
                       "update_norm": update_norm, "clipped_updates": clipped,
                       "norm_excess": diag.relu_norm_excess([m.weight for m in linears], [m.bias for m in linears])}
            if pre.amortised is not None:   # share of output factors decomposed afresh (1 = exact's cost)
                metrics["curvature_refresh_rate"] = pre.amortised.refresh_rate()
            if opt.precision == "mixed" and pre.mixed_totals[0]:      # decompositions redone in float64
                metrics["float64_fallbacks_per_step"] = pre.fallbacks_per_step()
            yield tracker.eval(step, metrics)
        if step == steps:
            break
        if cursor + cfg.batch_size > n_train:  # new epoch: a fresh permutation, no partial batch
            order, cursor = torch.randperm(n_train, generator=gen), 0
        idx = order[cursor:cursor + cfg.batch_size].to(device)
        cursor += cfg.batch_size
        sgd.zero_grad(set_to_none=True)
        batch_loss = float(pre.forward_backward(x_train[idx], targets(y_train[idx])))
        reason = None if math.isfinite(batch_loss) else f"minibatch loss is {batch_loss}"
        if reason is None:
            try:
                pre.precondition()
            except (RuntimeError, ArithmeticError) as e:  # CurvatureOverflowError, a failing eigensolver
                reason = f"update rule failed: {e}"
        if reason is None:
            grads = [p.grad for p in params]
            if opt.clip is not None:
                clipped += int(clip_update(grads, opt.lr, opt.clip)[1])
            update_norm = opt.lr * diag.flat_norm([g for g in grads if g is not None])
            sgd.step()
            reason = diag.divergence_reason(0.0, weight_norm(), cfg.max_weight_norm)
            if reason is None and not all(bool(torch.isfinite(p).all()) for p in params):
                reason = "a bias is not finite"
        if reason:
            # the step that produced the bad loss/weights is the one that diverged
            yield tracker.summary(step + 1 if "weight" in reason or "bias" in reason else step,
                                  clipped_updates=clipped, diverged_reason=reason)
            return
    yield tracker.summary(steps, clipped_updates=clipped)
