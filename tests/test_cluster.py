"""Multi-node and fault tests of the sweep on a real cluster (issue 5).

Real components only: a Ray cluster of several nodes on loopback (`ray.cluster_utils.Cluster`: a head
that runs no trials and three 1-CPU worker nodes, one of which declares a GPU), Ray token
authentication on as in docker/compose.yaml, a real `mlflow server` whose backend store is a fresh
PostgreSQL database, and `python -m sweep` in a subprocess pointed at both through `cluster.address`
and `tracking.uri`. Every fixture stops what it started, by API or pid, also when a test fails.

Mocked, because it cannot run here: the GPU. The GPU node declares `num_gpus=1`, which is only a
number to Ray's scheduler; what is checked is that a fractional GPU request reaches Ray and is granted
(see docs/cluster.md: GPU scheduling is untested on real GPUs).
"""
from __future__ import annotations

import multiprocessing
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from services import free_port, run_sweep, start_mlflow, start_sweep, stop, sweep_env, sweep_runs, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TOKEN = secrets.token_hex(16)  # this test session's Ray token, like RAY_AUTH_TOKEN in docker/.env
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG = dict(host="127.0.0.1", port=5432, user="postgres")
N_WORKER_NODES = 3
# The smoke grid (conf/experiment/smoke.yaml): 2 optimizers x 2 gains x 2 seeds.
SMOKE_POINTS = 8
# Longer trials of one optimizer, for the fault tests: long enough to be caught mid-trial (converge_tol=null:
# every trial runs all its steps, so the expected evaluations are known).
SLOW = ["sweep.axes.optimizer=[sqrt_ngd_d]", "sweep.seeds=[0,1,2,3]", "trainer.steps=4000",
        "trainer.eval_every=50", "trainer.converge_tol=null"]
EVAL_KEYS = ("train_loss", "test_loss", "weight_norm", "conservation_drift", "update_norm")


def evaluations(steps: int, eval_every: int) -> list[int]:
    """The steps a trainer evaluates at (Contract 2: step 0, every eval_every steps, the last step)."""
    return sorted(set(range(0, steps + 1, eval_every)) | {steps})


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def postgres_uri():
    """A fresh PostgreSQL database for this module's MLflow server; dropped afterwards."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG)
    except psycopg2.OperationalError as e:
        if CI:
            pytest.fail(f"PostgreSQL is required on 127.0.0.1:5432 in CI: {e}")
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 ({e})")
    admin.autocommit = True
    name = f"cs_test_{secrets.token_hex(6)}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        # psycopg2 named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed.
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


class Tracking:
    """The module's `mlflow server` (PostgreSQL backend); `outage()` stops it and starts it again on
    the same port, as a restarted tracking container would come back."""

    def __init__(self, root: Path, backend: str):
        self.root, self.backend = root, backend
        self.server = start_mlflow(root, backend_uri=backend)
        self.port = self.server.port

    @property
    def uri(self) -> str:
        return self.server.uri

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server = start_mlflow(self.root, backend_uri=self.backend, port=self.port)


@pytest.fixture(scope="module")
def tracking(postgres_uri, tmp_path_factory):
    t = Tracking(tmp_path_factory.mktemp("mlflow"), postgres_uri)
    try:
        yield t
    finally:
        t.stop()


class RayCluster:
    """A head (0 CPUs: it runs no trials, like the compose `ray-head`) and 1-CPU worker nodes on
    loopback, with token authentication; node 0 declares one (fake) GPU."""

    def __init__(self, root: str):
        from ray.cluster_utils import Cluster

        self.root = root
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=0, num_gpus=0, temp_dir=os.path.join(root, "ray"), node_ip_address="127.0.0.1",
            gcs_server_port=free_port(), include_dashboard=True, dashboard_host="127.0.0.1",
            dashboard_port=free_port(), dashboard_agent_listen_port=free_port()))
        try:
            self.gpu_node = self.add_worker(num_gpus=1)
            for _ in range(N_WORKER_NODES - 1):
                self.add_worker()
        except BaseException:
            self.shutdown()  # the nodes started so far
            raise

    def add_worker(self, num_gpus: int = 0):
        node = self.cluster.add_node(num_cpus=1, num_gpus=num_gpus, node_ip_address="127.0.0.1")
        self.cluster.wait_for_nodes()
        return node

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def dashboard(self) -> str:
        return f"http://{self.cluster.webui_url}"

    @property
    def head_id(self) -> str:
        return self.cluster.head_node.node_id

    def worker_ids(self) -> set[str]:
        return {n.node_id for n in self.cluster.worker_nodes}

    def replace(self, node_id: str) -> None:
        """A fresh node in place of a removed one (what a restarted worker container does)."""
        if node_id == self.gpu_node.node_id:
            self.gpu_node = self.add_worker(num_gpus=1)
        else:
            self.add_worker()

    def node(self, node_id: str):
        return next(n for n in self.cluster.worker_nodes if n.node_id == node_id)

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def ray_cluster():
    root = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    os.mkdir(os.path.join(root, "ray"))
    env = pytest.MonkeyPatch()
    # RAY_TMPDIR: Cluster writes its address file (ray_current_cluster) into $RAY_TMPDIR/ray, so a
    # stale one never lands in the shared /tmp/ray. Token auth as in docker/compose.yaml.
    for k, v in dict(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=root,
                     RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN).items():
        env.setenv(k, v)
    env.delenv("RAY_ADDRESS", raising=False)
    cluster = None
    try:
        cluster = RayCluster(root)
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        env.undo()
        shutil.rmtree(root, ignore_errors=True)


def sweep_cmd(cluster: RayCluster, tracking: Tracking, experiment: str, results: Path, *overrides: str) -> list:
    return ["+experiment=smoke", f"cluster.address={cluster.address}", f"tracking.uri={tracking.uri}",
            f"tracking.experiment={experiment}", f"results_dir={results}", *overrides]


def env_for_sweep() -> dict:
    return sweep_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                     RAY_TMPDIR=os.environ["RAY_TMPDIR"])  # the ray_cluster fixture's


def visible_children(uri: str, experiment: str):
    """The sweep's child runs that are not deleted (a lost attempt's run is deleted when retried)."""
    parents, children = sweep_runs(uri, experiment)
    assert parents is not None and len(parents) == 1, "one parent run per sweep"
    return children


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def max_overlap(intervals) -> int:
    """Most intervals (start, end) open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = now = 0
    for _, delta in events:
        now += delta
        best = max(best, now)
    return best


# ------------------------------------------------------------------------------------------- tests
def test_token_auth_rejects_a_client_without_the_token(ray_cluster):
    """What docker/compose.yaml relies on: with RAY_AUTH_MODE=token, a wrong token is refused."""
    ray = shutil.which("ray", path=os.path.dirname(sys.executable))
    ok = subprocess.run([ray, "health-check", f"--address={ray_cluster.address}"], env=env_for_sweep(),
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = subprocess.run([ray, "health-check", f"--address={ray_cluster.address}"],
                         env=env_for_sweep() | {"RAY_AUTH_TOKEN": "not-the-token"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "InvalidAuthToken" in bad.stderr


def test_smoke_sweep_spreads_trials_over_worker_nodes(ray_cluster, tracking, tmp_path):
    proc, seconds = run_sweep(sweep_cmd(ray_cluster, tracking, "multinode", tmp_path), tmp_path,
                              timeout=300, env=env_for_sweep())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    children = visible_children(tracking.uri, "multinode")
    assert len(children) == SMOKE_POINTS and set(children["status"]) == {"FINISHED"}
    assert children["tags.trial.key"].nunique() == SMOKE_POINTS
    nodes = set(children["tags.node.id"])
    assert len(nodes) > 1, f"all trials ran on one node: {nodes}"
    assert nodes <= ray_cluster.worker_ids() and ray_cluster.head_id not in nodes, "no trial on the head"
    print(f"multi-node smoke sweep: {seconds:.1f}s, trials on {len(nodes)} nodes")


def test_fractional_gpu_request_reaches_ray(ray_cluster, tracking, tmp_path):
    """resources.gpu=0.25: four workers share the one (declared) GPU, each granted a quarter of it."""
    from ray.util.state import list_actors

    before = {a.actor_id for a in list_actors(address=ray_cluster.dashboard, limit=10000,
                                              filters=[("class_name", "=", "TrialWorker")])}
    proc, _ = run_sweep(sweep_cmd(ray_cluster, tracking, "fractional-gpu", tmp_path,
                                  "resources.gpu=0.25", "resources.cpu=0.25"),
                        tmp_path, timeout=300, env=env_for_sweep())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    children = visible_children(tracking.uri, "fractional-gpu")
    assert len(children) == SMOKE_POINTS and set(children["status"]) == {"FINISHED"}
    # Ray assigned GPU 0 of the GPU node to every trial's worker.
    assert set(children["tags.worker.gpu_ids"]) == {"0"}
    assert set(children["tags.node.id"]) == {ray_cluster.gpu_node.node_id}
    # Ray's own record of what each worker actor asked for.
    actors = [a for a in list_actors(address=ray_cluster.dashboard, limit=10000, detail=True,
                                     filters=[("class_name", "=", "TrialWorker")])
              if a.actor_id not in before]
    assert len(actors) == 4, [a.required_resources for a in actors]  # 1 GPU / 0.25 per worker
    for a in actors:
        assert a.required_resources == {"CPU": 0.25, "GPU": 0.25}, a.required_resources
        assert a.node_id == ray_cluster.gpu_node.node_id


def _writer(uri: str, experiment_id: str, parent: str, index: int, batches: int, keys: int, barrier, out):
    """One concurrent writer: its own run, `batches` log_batch calls of `keys` metrics each."""
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        run = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent, "writer": str(index)})
        barrier.wait(timeout=120)
        start = time.time()
        for step in range(batches):
            now = int(time.time() * 1000)
            client.log_batch(run.info.run_id, metrics=[
                Metric(f"m{k}", index * 1e6 + step * 1e3 + k, now, step) for k in range(keys)])
        client.set_terminated(run.info.run_id, "FINISHED")
        out.put((index, run.info.run_id, start, time.time(), None))
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
        out.put((index, None, 0, 0, repr(e)))


def test_concurrent_writers_into_postgres_backed_server(tracking):
    """The sweep's driver is its only MLflow writer; this shows the server + PostgreSQL also take many
    writers at once: 12 processes, released together, each logging 25 batches of 40 metrics."""
    from mlflow.tracking import MlflowClient

    n, batches, keys = 12, 25, 40
    client = MlflowClient(tracking.uri)
    exp = client.create_experiment(f"writers-{secrets.token_hex(3)}")
    parent = client.create_run(exp).info.run_id
    ctx = multiprocessing.get_context("fork")  # cheap: mlflow is already imported here
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(tracking.uri, exp, parent, i, batches, keys, barrier, out))
             for i in range(n)]
    try:
        for p in procs:
            p.start()
        results = [out.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = [r[4] for r in results if r[4]]
    assert not errors, errors
    assert all(p.exitcode == 0 for p in procs)
    windows = [(r[2], r[3]) for r in results]
    overlap = max_overlap(windows)
    assert overlap >= 8, f"only {overlap} writers overlapped: {windows}"
    for index, run_id, *_ in results:
        for k in range(keys):
            history = client.get_metric_history(run_id, f"m{k}")
            assert sorted((m.step, m.value) for m in history) == [
                (s, index * 1e6 + s * 1e3 + k) for s in range(batches)]
    assert client.get_run(parent).info.status == "RUNNING"
    print(f"{n} writers, {n * batches} log_batch calls, {n * batches * keys} metrics; "
          f"max overlap {overlap}; slowest writer {max(e - s for s, e in windows):.1f}s")


def test_eight_trials_at_once_lose_no_metric(ray_cluster, tracking, tmp_path):
    """resources.cpu=0.25 on three 1-CPU nodes: 8 trials run and stream records at the same time."""
    steps, every = 3000, 25  # trials outlast the workers' staggered start, so all 8 overlap
    proc, seconds = run_sweep(sweep_cmd(ray_cluster, tracking, "eight-at-once", tmp_path, "resources.cpu=0.25",
                                        "resources.workers=8", "sweep.axes.optimizer=[sqrt_ngd_d]",
                                        "sweep.seeds=[0,1,2,3]", f"trainer.steps={steps}",
                                        f"trainer.eval_every={every}", "trainer.converge_tol=null"),
                              tmp_path, timeout=400, env=env_for_sweep())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    children = visible_children(tracking.uri, "eight-at-once")
    assert len(children) == 8 and set(children["status"]) == {"FINISHED"}
    assert set(children["tags.status"]) == {"finished"}
    overlap = max_overlap(list(zip(children["start_time"], children["end_time"])))
    assert overlap >= 8, f"only {overlap} trials overlapped"
    _assert_no_metric_missing(tracking.uri, children, steps, every)
    print(f"8 concurrent trials: {seconds:.1f}s, max overlap {overlap}")


def _assert_no_metric_missing(uri: str, children, steps: int, every: int) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    expected = evaluations(steps, every)
    for run_id in children["run_id"]:
        for key in EVAL_KEYS:
            assert metric_steps(client, run_id, key) == expected, (run_id, key)
        for key in ("final_test_loss", "early_stop_step", "max_conservation_drift"):
            assert len(client.get_metric_history(run_id, key)) == 1, (run_id, key)


def test_tracking_outage_mid_sweep_loses_nothing(ray_cluster, tracking, tmp_path):
    """The MLflow server goes away for ~10 s while trials run, then comes back on the same port."""
    from mlflow.tracking import MlflowClient

    steps, every = 4000, 50
    log = tmp_path / "sweep.out"
    proc = start_sweep(sweep_cmd(ray_cluster, tracking, "outage", tmp_path, *SLOW), tmp_path,
                       env=env_for_sweep(), log=log)
    try:
        client = MlflowClient(tracking.uri)

        def some_finished():
            exp = client.get_experiment_by_name("outage")
            return exp and client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and "
                                              "tags.`mlflow.parentRunId` != ''", max_results=1)
        wait_for(some_finished, timeout=240, what="a first finished trial")
        assert proc.poll() is None, "the sweep ended before the outage"
        tracking.stop()
        down = time.monotonic()
        time.sleep(10)
        assert proc.poll() is None, "the sweep must keep running while tracking is down"
        tracking.start()
        outage = time.monotonic() - down
        proc.wait(timeout=300)
    finally:
        stop(proc)
        if tracking.server.proc is None or tracking.server.proc.poll() is not None:
            tracking.start()  # leave the module's server up for the other tests
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    assert "tracking lost" not in output
    retried = sum(len(re.findall(r"tracking call \S+ failed", p.read_text()))
                  for p in (tmp_path / "logs").glob("sweep-*.log"))
    assert retried > 0, "the sweep never noticed the outage"
    children = visible_children(tracking.uri, "outage")
    assert len(children) == 8 and set(children["status"]) == {"FINISHED"}
    assert children["tags.trial.key"].nunique() == 8
    _assert_no_metric_missing(tracking.uri, children, steps, every)
    print(f"outage {outage:.1f}s; {retried} tracking calls retried; 8/8 trials complete")


def test_node_failure_mid_sweep_is_retried(ray_cluster, tracking, tmp_path):
    """Kill a worker node while it runs a trial: the trial reruns elsewhere (attempt 2), the sweep
    completes, each grid point has exactly one FINISHED run. Two workers, three nodes: one spare."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    steps, every = 4000, 50
    log = tmp_path / "sweep.out"
    proc = start_sweep(sweep_cmd(ray_cluster, tracking, "node-failure", tmp_path, *SLOW, "resources.workers=2"),
                       tmp_path, env=env_for_sweep(), log=log)
    removed = None
    try:
        client = MlflowClient(tracking.uri)

        def a_trial_in_flight():
            exp = client.get_experiment_by_name("node-failure")
            if exp is None:
                return None
            done = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and "
                                      "tags.`mlflow.parentRunId` != ''", max_results=1)
            running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING' and "
                                         "tags.`mlflow.parentRunId` != ''", order_by=["attributes.start_time DESC"])
            running = [r for r in running if r.data.tags.get("node.id") in ray_cluster.worker_ids()]
            return running[0] if done and running else None
        victim = wait_for(a_trial_in_flight, timeout=240, interval=0.3, what="a trial running on a worker node")
        removed = victim.data.tags["node.id"]
        ray_cluster.cluster.remove_node(ray_cluster.node(removed), allow_graceful=False)
        proc.wait(timeout=300)
    finally:
        stop(proc)
        if removed is not None:  # give the module its node back
            ray_cluster.replace(removed)
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    children = visible_children(tracking.uri, "node-failure")
    assert len(children) == 8 and set(children["status"]) == {"FINISHED"}
    assert children["tags.trial.key"].nunique() == 8, "exactly one visible run per grid point"
    victim_key = victim.data.tags["trial.key"]
    rerun = children[children["tags.trial.key"] == victim_key].iloc[0]
    assert int(rerun["tags.attempt"]) >= 2 and rerun["tags.node.id"] != removed
    assert set(children["tags.node.id"]) <= ray_cluster.worker_ids() | {removed}
    # The lost attempt stays visible among the deleted runs, tagged with the node that died.
    exp = client.get_experiment_by_name("node-failure")
    lost = client.search_runs([exp.experiment_id], f"tags.`trial.key` = '{victim_key}'",
                              run_view_type=ViewType.DELETED_ONLY)
    assert any(r.data.tags.get("attempt") == "1" and r.data.tags.get("node.id") == removed for r in lost)
    _assert_no_metric_missing(tracking.uri, children, steps, every)
    print(f"node {removed[:8]} removed mid-trial; trial {victim_key} rerun as attempt {rerun['tags.attempt']}")
