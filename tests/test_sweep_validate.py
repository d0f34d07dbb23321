"""Bad invocations, many in one process: every one exits 2 before anything starts, with one line that
names the field, never a traceback, never a leftover. The trial sections are judged by the trainers'
own rules (trainers.check_config), so what passes here is what the workers accept.

One subprocess (`_batch`) runs `sweep.cli.check_args` over all the cases; the real CLI path for a few
of them is covered by tests/test_sweep_config.py."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from services import free_port, sweep_env, wait_for

REPO = Path(__file__).resolve().parent.parent
BASE = ["+experiment=smoke"]

# (overrides, the field the message must name) -- the cases of issue 13 and the older ones.
BAD = [
    (["+trainer.step=10"], "trainer.step"),                        # Hydra's own suggested fix for a typo
    (["trainer.widht=3"], "trainer.widht"),
    (["trainer.steps=many"], "trainer.steps"),
    (["optimizer.lr=inf"], "optimizer.lr"),
    (["optimizer.lr=0"], "optimizer.lr"),
    (["optimizer.lr=nan"], "optimizer.lr"),
    (["trainer.gain=inf"], "trainer.gain"),
    (["trainer.gain=-1e-3"], "trainer.gain"),
    (["optimizer=ngd", "optimizer.q=3"], "optimizer.q"),          # q on a fixed-q optimizer
    (["optimizer=qngd", "optimizer.q=0.5"], "optimizer.q"),
    (["optimizer=ngd", "optimizer.structure=block"], "optimizer.structure"),
    (["trainer.rank=3"], "trainer.teacher_singular_values"),     # smoke's teacher has 2 values
    (["+experiment=teacher_student", "trainer.rank=2"], "trainer.teacher_singular_values"),
    (["trainer.init=xavier"], "trainer.init"),
    (["trainer.whiten=true", "trainer.train_samples=3"], "trainer.whiten"),
    (["+experiment=mnist_gain", "trainer.train_subset=100"], "trainer.train_subset"),
    (["+experiment=mnist_gain", "trainer.data.root=/nonexistent"], "trainer.data.root"),
    (["+experiment=mnist_gain", "trainer.data.name=kmnist"], "trainer.data.name"),
    (["device=cuda"], "device"),
    (["device=tpu"], "device"),
    (["resources.gpu=1"], "resources.gpu"),
    (["resources.cpu=100"], "resources.cpu"),
    (["resources.cpu=0"], "resources.cpu"),
    (["cluster.num_cpus=0"], "cluster.num_cpus"),
    (["tracking.retry_s=-1"], "tracking.retry_s"),
    (["tracking.retry_s=inf"], "tracking.retry_s"),
    (["name="], "name"),
    (["results_dir=/etc/hostname"], "results_dir"),              # a file
    (["results_dir=/proc/sweep-results"], "results_dir"),        # cannot be written, even by root
    (["+foo=1"], "foo"),
    (["+resources.gpus=1"], "resources.gpus"),
    (["+optimizer.momentum=0.9"], "optimizer.momentum"),
    (["sweep.axes.optimizer=[]"], "sweep.axes.optimizer"),
    (["sweep.axes.optimizer=[sgd,adam]"], "sweep.axes.optimizer"),
    (["optimizer=adam"], "optimizer"),
    (["sweep.seeds=[]"], "sweep.seeds"),
    (["+sweep.variants.adamw={optimizer:{lr:1}}"], "sweep.variants.adamw"),
    (["sweep.variants.sgd.optimizer.lr=abc"], "optimizer.lr"),
    (["sweep.max_retries=-1"], "sweep.max_retries"),
    (["+experiment=nope"], "experiment"),
    (["trainer.gain=é"], "trainer.gain"),                          # unicode, unquoted
    (["trainer.init=\"ñ\""], "trainer.init"),                     # unicode, quoted
    (["ŝeed=1"], "ŝeed"),
    (["seed=1.5"], "seed"),
    (["trainer.steps=["], "trainer.steps"),
]


def _fuzz_cases() -> list[list[str]]:
    """Every trainer / optimizer field of the smoke experiment crossed with values of the wrong type,
    out of range, infinite, and unknown keys with and without `+`."""
    from trainers import OptimizerConfig
    from trainers.linear_teacher import LinearTeacherConfig
    values = ["abc", "-1", "0", "inf", "-inf", "nan", "1e400", "[1,2]", "{a:1}", "null", "true", "'€'"]
    cases, i = [], 0
    for section, cls in (("trainer", LinearTeacherConfig), ("optimizer", OptimizerConfig)):
        for f in dataclasses.fields(cls):  # three values per field, taking turns through the list
            for _ in range(3):
                cases.append([f"{section}.{f.name}={values[i % len(values)]}"])
                i += 1
        cases += [[f"{section}.nosuchfield=1"], [f"+{section}.nosuchfield=1"], [f"++{section}.nosuchfield=1"]]
    return cases


SCRIPT = r"""
import contextlib, io, json, sys, time
from sweep import cli
out = []
for args in json.loads(sys.stdin.read()):
    err, t0, code = io.StringIO(), time.monotonic(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.check_args(args)
        except SystemExit as e:
            code = e.code
        except BaseException as e:  # a crash is a finding, reported as such
            import traceback
            code, err = "crash", io.StringIO(traceback.format_exc())
    out.append({"args": args, "code": code, "stderr": err.getvalue(), "seconds": time.monotonic() - t0,
                "heavy": sorted(m for m in ("torch", "ray", "mlflow") if m in sys.modules)})
print(json.dumps(out))
"""


def _batch(cases: list[list[str]], cwd: Path) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], input=json.dumps(cases), cwd=cwd, env=sweep_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _one_line(result: dict) -> str:
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result
    assert "Traceback" not in result["stderr"] and " Fix: " in lines[0], result
    return lines[0]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("bad")
    cases = [[*(BASE if not any(a.startswith("+experiment=") for a in o) else []), *o,
              f"results_dir={cwd / 'results'}" if not any(a.startswith("results_dir") for a in o) else ""]
             for o, _ in BAD]
    cases = [[a for a in c if a] for c in cases]
    fuzz = [[*BASE, *o, f"results_dir={cwd / 'results'}"] for o in _fuzz_cases()]
    results = _batch(cases + fuzz, cwd)
    return cwd, results[:len(BAD)], results[len(BAD):]


@pytest.mark.parametrize("i", range(len(BAD)), ids=[" ".join(o)[:40] for o, _ in BAD])
def test_bad_invocation_is_one_line_naming_the_field(batch, i):
    _, results, _ = batch
    result, (overrides, field) = results[i], BAD[i]
    assert result["code"] == 2, result
    line = _one_line(result)
    assert line.startswith(f"error: {field}") or f" {field}" in line or f"{field}=" in line, line
    assert result["seconds"] < 10, result


def test_fuzzed_overrides_either_pass_the_trainer_rules_or_fail_in_one_line(batch):
    cwd, _, results = batch
    rejected = 0
    for result in results:
        key = result["args"][1].split("=", 1)[0].lstrip("+")
        if result["code"] == 0:  # accepted: then the trainers accept every trial (the same rules)
            assert "nosuchfield" not in key, result
            continue
        assert result["code"] == 2, result
        line = _one_line(result)
        assert key in line, (key, line)
        assert result["seconds"] < 10, result
        rejected += 1
    assert rejected > 0.7 * len(results), f"only {rejected} of {len(results)} fuzzed overrides rejected"
    assert results[-1]["heavy"] == [], "checking every case imported no torch, Ray or MLflow (trainers.config)"
    assert list(cwd.iterdir()) == [], "bad invocations must leave nothing behind"


def test_good_invocation_passes_the_same_checks(tmp_path):
    results = _batch([[*BASE, f"results_dir={tmp_path / 'r'}"], ["+experiment=mnist_gain"],
                      ["+experiment=teacher_student"], ["+experiment=fractional_q"]], tmp_path)
    assert [r["code"] for r in results] == [0, 0, 0, 0], results


def test_wrong_services_fail_in_seconds_naming_the_field(tmp_path, mlflow_server):
    """Open ports that are not what the field needs: a plain web server, a port that accepts and never
    answers, and the MLflow server given as a Ray cluster. Protocol handshakes, not TCP connects."""
    import socket
    web_port, silent = free_port(), socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(web_port), "--bind", "127.0.0.1"],
                           cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", web_port)) == 0, 30, what="the web server")
        mute = f"127.0.0.1:{silent.getsockname()[1]}"
        mlflow_hostport = mlflow_server.uri.split("//", 1)[1]
        cases = [("cluster.address", f"127.0.0.1:{web_port}"), ("cluster.address", mute),
                 ("cluster.address", mlflow_hostport), ("tracking.uri", f"http://127.0.0.1:{web_port}"),
                 ("tracking.uri", f"http://{mute}")]
        results = _batch([[*BASE, f"{field}={value}", f"results_dir={tmp_path / 'r'}"] for field, value in cases],
                         tmp_path)
    finally:
        web.kill()
        silent.close()
    for (field, value), result in zip(cases, results):
        assert result["code"] == 2, result
        line = _one_line(result)
        assert line.startswith(f"error: {field} ") and ("is not a Ray cluster" in line or
                                                        "is not an MLflow tracking server" in line), line
        assert result["seconds"] < 10, result
    good = _batch([[*BASE, f"tracking.uri={mlflow_server.uri}", f"results_dir={tmp_path / 'r'}"]], tmp_path)
    assert good[0]["code"] == 0, good
