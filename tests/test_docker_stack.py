"""The Compose cluster on a real Docker engine (issue 14): built, brought up, swept through, faulted.

The stack is the one users start, docker/compose.yaml with the CPU override (docker/compose.cpu.yaml)
and the offline override (docker/compose.offline.yaml): no registry is reachable here, so every image,
PostgreSQL included, is built FROM the local base image that docker/ci-engine.sh makes with debootstrap.
The CPU torch wheel pip uses on this machine and the machine's extra CA certificates go into the
git-ignored docker/local/ for the build (docker/local/README.md) and are removed afterwards.

Host-side traffic goes only to the two ports the stack publishes on 127.0.0.1; everything else is
checked from inside the containers, on their own compose networks. Every container, network and
volume is removed at the end (`down -v`, also when a test fails); the images stay as build cache.
Where no engine answers the module is skipped with the reason (in CI, where .ci/run starts one, it fails).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from services import free_port, stop, wait_for

# A cold build (nothing cached) is part of the first test's setup: 262 s on a quiet fresh machine, ~18 min
# at load 12-55 (docs/cluster.md); the timeout leaves room for the loaded case.
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(2700)]

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
FILES = [DOCKER_DIR / "compose.yaml", DOCKER_DIR / "compose.cpu.yaml", DOCKER_DIR / "compose.offline.yaml"]
LOCAL_CA, LOCAL_WHEELS = DOCKER_DIR / "local" / "ca", DOCKER_DIR / "local" / "wheels"
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")  # Debian's directory of a machine's extra CAs
BASE_IMAGE = os.environ.get("CURVATURE_SWEEP_BASE_IMAGE", "local/debian:bookworm")
TORCH_WHEEL = "torch-2.13.0+cpu-cp311-cp311-*.whl"  # the image's Python is Debian bookworm's 3.11
IMAGE_TAG = "test"  # fixed, so a later run reuses the build cache
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HEALTHY = ("postgres", "mlflow", "ray-head")  # the services with a healthcheck
WORKER = "ray-worker-cpu"
# The smoke grid (conf/experiment/smoke.yaml): 2 optimizers x 2 gains x 2 seeds.
SMOKE_POINTS = 8
# A short slice of mnist_gain: 2 optimizers x its 4 gains x 1 seed, 20 steps.
MNIST_SLICE = ["+experiment=mnist_gain", "sweep.axes.optimizer=[sgd,sqrt_ngd_d]", "sweep.seeds=[0]",
               "trainer.steps=20", "trainer.eval_every=10", "trainer.log_eval=false"]
MNIST_POINTS = 8
# Longer smoke trials of one optimizer (2 gains x 4 seeds = 8), long enough to be caught mid-trial.
SLOW_STEPS, SLOW_EVERY = 4000, 50
SLOW = ["+experiment=smoke", "sweep.axes.optimizer=[sqrt_ngd_d]", "sweep.seeds=[0,1,2,3]",
        f"trainer.steps={SLOW_STEPS}", f"trainer.eval_every={SLOW_EVERY}", "trainer.converge_tol=null"]
EVAL_KEYS = ("train_loss", "test_loss", "weight_norm", "conservation_drift", "update_norm")
ONCE_KEYS = ("final_test_loss", "early_stop_step", "max_conservation_drift")


def evaluations(steps: int, eval_every: int) -> list[int]:
    """The steps a trainer evaluates at (Contract 2: step 0, every eval_every steps, the last step)."""
    return sorted(set(range(0, steps + 1, eval_every)) | {steps})


def sh(*cmd, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {out.returncode}:\n{out.stdout[-3000:]}\n"
                             f"{out.stderr[-3000:]}")
    return out


def engine() -> tuple[str, list[str]]:
    """(docker CLI, compose command), or skip (fail in CI) with what is missing and the fix."""
    def missing(why: str):
        why += " (bash docker/ci-engine.sh, as root, installs and starts one and builds the base image)"
        if CI:
            pytest.fail(f"{why}; .ci/run prepares it in CI")
        pytest.skip(why)

    docker = shutil.which("docker")
    if docker is None:
        missing("no docker CLI")
    info = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=30)
    if info.returncode != 0:
        missing(f"no Docker engine answers: {(info.stderr.strip().splitlines() or ['?'])[-1]}")
    if subprocess.run([docker, "image", "inspect", BASE_IMAGE], capture_output=True, timeout=30).returncode:
        missing(f"no base image {BASE_IMAGE}")
    if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return docker, [docker, "compose"]
    if shutil.which("docker-compose"):
        return docker, [shutil.which("docker-compose")]
    missing("no Docker Compose (docker compose / docker-compose)")


def local_torch_wheel() -> Path | None:
    """The CPU torch wheel pip installs from this machine's disk (its find-links), if there is one."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    dirs = os.environ.get("PIP_FIND_LINKS", "").split() + re.findall(r"find-links='([^']+)'", listed.stdout)
    for d in dirs:
        d = d.removeprefix("file://")
        found = sorted(Path(d).glob(TORCH_WHEEL)) if "://" not in d else []
        if found:
            return found[-1]
    return None


def place(src: Path, dest_dir: Path, added: list) -> None:
    """Put a file into docker/local/ for the build (hard link where possible), remembering it."""
    dest = dest_dir / src.name
    if dest.exists():
        return  # the developer's own copy: leave it
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
    added.append(dest)


class Stack:
    """One compose project of its own (random name, free loopback ports, fresh secrets)."""

    def __init__(self, docker: str, compose: list[str], tmp: Path):
        self.docker, self.tmp = docker, tmp
        self.project = f"cstest{secrets.token_hex(4)}"
        self.token, self.mlflow_port, self.dash_port = secrets.token_hex(16), free_port(), free_port()
        values = dict(COMPOSE_PROJECT_NAME=self.project, RAY_AUTH_TOKEN=self.token,
                      POSTGRES_PASSWORD=secrets.token_hex(12), MLFLOW_PORT=str(self.mlflow_port),
                      RAY_DASHBOARD_PORT=str(self.dash_port), RAY_WORKER_SHM_SIZE="1gb", IMAGE_TAG=IMAGE_TAG,
                      BASE_IMAGE=BASE_IMAGE)
        if local_torch_wheel() is not None:
            values["TORCH_INDEX_URL"] = ""  # torch from docker/local/wheels/, not PyTorch's index
        env_file = tmp / "compose.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        # The developer's shell must not override the test's values (Compose prefers the environment).
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("COMPOSE_", "RAY_", "MLFLOW_", "POSTGRES_")) and k not in values} | values
        self.base = [*compose, "--project-name", self.project, "--env-file", str(env_file),
                     *[a for f in FILES for a in ("-f", str(f))]]
        self.timings: dict[str, float] = {}

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def compose(self, *args, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return sh(*self.base, *args, timeout=timeout, check=check, cwd=ROOT, env=self.env)

    def containers(self, service: str | None = None, all: bool = False) -> list[str]:
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        return sh(self.docker, "ps", "-q", "--no-trunc", *(["-a"] if all else []), *filters).stdout.split()

    def container(self, service: str) -> str:
        ids = self.containers(service)
        assert len(ids) == 1, f"{service}: {len(ids)} containers running"
        return ids[0]

    def inspect(self, *ids: str) -> list[dict]:
        return json.loads(sh(self.docker, "inspect", *ids).stdout) if ids else []

    def exec(self, service: str, *cmd, check: bool = True, timeout: float = 60, env: dict | None = None):
        """`docker exec` in the (first) container of a service."""
        ids = self.containers(service)
        assert ids, f"no {service} container running"
        extra = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        return sh(self.docker, "exec", *extra, ids[0], *cmd, check=check, timeout=timeout)

    def psql(self, sql: str) -> list[list[str]]:
        out = self.exec("postgres", "psql", "-U", "mlflow", "-d", "mlflow", "-tA", "-F", "\t", "-c", sql).stdout
        return [line.split("\t") for line in out.splitlines() if line]

    def dashboard(self, path: str, token: str | None = None, data: dict | None = None) -> tuple[int, str]:
        """(status, body) of a Ray dashboard HTTP call from the host, on its published loopback port."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.dash_port}{path}",
                                     data=json.dumps(data).encode() if data is not None else None,
                                     headers={"Content-Type": "application/json"})
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def ray_nodes(self) -> list[dict]:
        """Ray's alive nodes (state API through the dashboard, with the token)."""
        status, body = self.dashboard("/api/v0/nodes?limit=1000&detail=true", token=self.token)
        assert status == 200, (status, body[:500])
        return [n for n in json.loads(body)["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def ip_of(self, container: str) -> str:
        nets = self.inspect(container)[0]["NetworkSettings"]["Networks"]
        return nets[f"{self.project}_default"]["IPAddress"]

    def trial_nodes(self, container: str) -> set[str]:
        """Ray node ids, alive or dead, of the raylets a worker container has run (a raylet that died
        under load is replaced by a new one with a new id; drivers' nodes have no CPUs)."""
        ip = self.ip_of(container)
        status, body = self.dashboard("/api/v0/nodes?limit=1000&detail=true", token=self.token)
        assert status == 200, (status, body[:500])
        return {n["node_id"] for n in json.loads(body)["data"]["result"]["result"]
                if n["node_ip"] == ip and (n.get("resources_total") or {}).get("CPU")}

    def node_of(self, container: str, starting: bool = False) -> str | None:
        """Ray node id of the raylet in a container (matched by the container's address). `starting`:
        the dashboard may not listen yet (the head's healthcheck asks the GCS only): None until it does."""
        ip = self.ip_of(container)
        try:
            nodes = self.ray_nodes()
        except (OSError, AssertionError):
            if starting:
                return None
            raise
        return next((n["node_id"] for n in nodes if n["node_ip"] == ip), None)

    def healthy(self) -> bool:
        for service in HEALTHY:
            ids = self.containers(service)
            if len(ids) != 1 or self.inspect(ids[0])[0]["State"].get("Health", {}).get("Status") != "healthy":
                return False
        return True

    def sweep(self, experiment: str, *overrides: str, env: dict | None = None, log: Path | None = None):
        """`compose run --rm sweep ...` (the README's command) for one experiment, in the background."""
        extra = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        cmd = [*self.base, "--profile", "sweep", "run", "--rm", "-T", *extra, "sweep", *overrides,
               f"tracking.experiment={experiment}", f"results_dir=/runs/{experiment}"]
        out = open(log or self.tmp / f"{experiment}.log", "w")
        return subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)

    def run_sweep(self, experiment: str, *overrides: str, timeout: float = 600, env: dict | None = None) -> str:
        log = self.tmp / f"{experiment}.log"
        proc = self.sweep(experiment, *overrides, env=env, log=log)
        try:
            proc.wait(timeout=timeout)
        finally:
            stop(proc)
        output = log.read_text()
        assert proc.returncode == 0, output[-4000:]
        return output

    def down(self) -> None:
        self.compose("--profile", "sweep", "--profile", "gpu", "down", "-v", "--remove-orphans", "--timeout", "10",
                     timeout=300, check=False)

    def leftovers(self) -> dict[str, list[str]]:
        label = ["--filter", f"label=com.docker.compose.project={self.project}"]
        named = lambda kind: [n for n in sh(self.docker, kind, "ls", "--format", "{{.Name}}").stdout.split()  # noqa: E731
                              if n.startswith(f"{self.project}_")]
        return {"containers": sh(self.docker, "ps", "-aq", *label).stdout.split(),
                "networks": sh(self.docker, "network", "ls", "-q", *label).stdout.split() + named("network"),
                "volumes": sh(self.docker, "volume", "ls", "-q", *label).stdout.split() + named("volume")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Build the images, bring the CPU stack up, wait for every healthcheck and the worker's raylet."""
    docker, compose = engine()
    s = Stack(docker, compose, tmp_path_factory.mktemp("stack"))
    added: list[Path] = []
    try:
        for ca in sorted(HOST_CA_DIR.glob("*.crt")):
            place(ca, LOCAL_CA, added)
        wheel = local_torch_wheel()
        if wheel is not None:
            place(wheel, LOCAL_WHEELS, added)
        t0 = time.monotonic()
        s.compose("build", "postgres", "mlflow", "ray-head", timeout=3000)
        s.timings["build_s"] = time.monotonic() - t0
    finally:
        for path in added:
            path.unlink(missing_ok=True)
    try:
        t0 = time.monotonic()
        s.compose("up", "-d", timeout=300)
        wait_for(s.healthy, timeout=300, interval=1, what="every healthcheck healthy")
        s.timings["up_to_healthy_s"] = time.monotonic() - t0
        wait_for(lambda: s.node_of(s.container(WORKER), starting=True), timeout=180, interval=1,
                 what="the worker's raylet")
        s.timings["up_to_worker_s"] = time.monotonic() - t0
        yield s
    finally:
        s.down()


def child_runs(uri: str, experiment: str, deleted: bool = False) -> list:
    """The sweep's child runs (visible ones, or the deleted lost attempts)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    view = ViewType.DELETED_ONLY if deleted else ViewType.ACTIVE_ONLY
    return [r for r in client.search_runs([exp.experiment_id], run_view_type=view, max_results=5000)
            if r.data.tags.get("mlflow.parentRunId")]


def parent_run(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return exp and client.search_runs([exp.experiment_id], max_results=1)


def assert_one_finished_run_per_point(s: Stack, experiment: str, points: int) -> list:
    """Through MLflow's API (host, loopback) and in its PostgreSQL tables (inside the postgres container)."""
    children = child_runs(s.mlflow_uri, experiment)
    assert len(children) == points, [(r.data.tags.get("trial.key"), r.info.status) for r in children]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert len({r.data.tags["trial.key"] for r in children}) == points, "exactly one run per grid point"
    rows = s.psql(f"""SELECT r.status, count(*), count(DISTINCT t.value) FROM runs r
                      JOIN experiments e ON e.experiment_id = r.experiment_id
                      JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'trial.key'
                      WHERE e.name = '{experiment}' AND r.lifecycle_stage = 'active' GROUP BY r.status""")
    assert rows == [["FINISHED", str(points), str(points)]], rows
    return children


def assert_no_metric_record_lost(s: Stack, experiment: str, points: int, steps: int, every: int) -> int:
    """Count every metric record of the trials' runs in PostgreSQL: each evaluated key at each evaluation
    step, once (the parent run's summary metrics are not trial records)."""
    rows = s.psql(f"""SELECT m.run_uuid, m.key, count(*), count(DISTINCT m.step), min(m.step), max(m.step)
                      FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid
                      JOIN experiments e ON e.experiment_id = r.experiment_id
                      WHERE e.name = '{experiment}' AND r.lifecycle_stage = 'active' AND r.status = 'FINISHED'
                        AND EXISTS (SELECT 1 FROM tags p WHERE p.run_uuid = r.run_uuid AND p.key = 'mlflow.parentRunId')
                      GROUP BY m.run_uuid, m.key""")
    got = {(run, key): tuple(map(int, rest)) for run, key, *rest in rows}
    runs = {run for run, _ in got}
    n_eval = len(evaluations(steps, every))
    assert len(runs) == points
    for run in runs:
        for key in EVAL_KEYS:
            assert got.get((run, key)) == (n_eval, n_eval, 0, steps), (run, key, got.get((run, key)))
        for key in ONCE_KEYS:
            assert got.get((run, key), (0,))[0] == 1, (run, key)
    counted = sum(got[(run, key)][0] for run in runs for key in EVAL_KEYS)
    assert counted == points * len(EVAL_KEYS) * n_eval
    return counted


def wait_running_child(s: Stack, experiment: str, on_nodes=None, finished_first: bool = False, timeout=300):
    def find():
        children = child_runs(s.mlflow_uri, experiment)
        if finished_first and not any(r.info.status == "FINISHED" for r in children):
            return None
        running = [r for r in children if r.info.status == "RUNNING"
                   and (on_nodes is None or r.data.tags.get("node.id") in on_nodes())]
        return running[0] if running else None
    return wait_for(find, timeout=timeout, interval=0.5, what=f"a running trial of {experiment}")


# ------------------------------------------------------------------------------------------- tests
def test_stack_builds_and_every_healthcheck_passes(stack):
    states = {svc: stack.inspect(stack.container(svc))[0]["State"] for svc in (*HEALTHY, WORKER)}
    assert all(st["Running"] for st in states.values())
    assert {svc: states[svc]["Health"]["Status"] for svc in HEALTHY} == dict.fromkeys(HEALTHY, "healthy")
    # The images the stack runs are the ones just built from the local base (nothing was pulled).
    images = {svc: stack.inspect(stack.container(svc))[0]["Config"]["Image"] for svc in (*HEALTHY, WORKER)}
    assert images == {"postgres": f"curvature-sweep-postgres:{IMAGE_TAG}", "mlflow": f"curvature-sweep-mlflow:{IMAGE_TAG}",
                      "ray-head": f"curvature-sweep:{IMAGE_TAG}-cpu", WORKER: f"curvature-sweep:{IMAGE_TAG}-cpu"}
    torch = stack.exec("ray-head", "python", "-c", "import torch; print(torch.__version__, torch.version.cuda)").stdout
    assert torch.split() == ["2.13.0+cpu", "None"], torch
    sizes = {img: int(stack.inspect(img)[0]["Size"]) / 1e6 for img in sorted(set(images.values()))}
    print(f"timings {json.dumps({k: round(v, 1) for k, v in stack.timings.items()})}; image sizes (MB) "
          f"{json.dumps({k: round(v) for k, v in sizes.items()})}")


def test_sweeps_run_through_the_cluster_on_worker_containers(stack):
    head, worker = stack.container("ray-head"), stack.container(WORKER)
    head_node = stack.node_of(head)
    for experiment, overrides, points in (("cluster-smoke", ["+experiment=smoke"], SMOKE_POINTS),
                                          ("cluster-mnist", MNIST_SLICE, MNIST_POINTS)):
        stack.run_sweep(experiment, *overrides)
        children = assert_one_finished_run_per_point(stack, experiment, points)
        # Every trial ran on the worker container, none on the head or in the driver's container.
        nodes = {r.data.tags["node.id"] for r in children}
        assert nodes and nodes <= stack.trial_nodes(worker) and head_node not in nodes, experiment
        assert {r.data.tags.get("worker.torch_device") for r in children} == {"cpu"}
    assert_no_metric_record_lost(stack, "cluster-mnist", MNIST_POINTS, 20, 10)


def test_worker_scaled_up_then_killed_mid_trial_is_retried(stack):
    """Scale the worker service to 2 while a sweep runs, then `docker kill` the new worker while it runs a
    trial: the trial reruns (attempt 2) on a live worker, every grid point ends with one FINISHED run."""
    experiment = "cluster-kill"
    first = stack.container(WORKER)
    # 4 trial workers: the first container (2 CPUs for Ray) places two; the sweep waits for room for
    # the others (up to SWEEP_WORKER_START_TIMEOUT_S) and gets it from the second container.
    proc = stack.sweep(experiment, *SLOW, "resources.workers=4", env={"SWEEP_WORKER_START_TIMEOUT_S": "400"})
    killed = killed_node = None
    try:
        wait_for(lambda: child_runs(stack.mlflow_uri, experiment) or parent_run(stack.mlflow_uri, experiment),
                 timeout=300, interval=0.5, what="the sweep's parent run")
        stack.compose("up", "-d", "--no-recreate", "--scale", f"{WORKER}=2", WORKER)
        new = [c for c in stack.containers(WORKER) if c != first]
        assert len(new) == 1, new
        killed = new[0]
        wait_for(lambda: stack.node_of(killed), timeout=180, interval=1, what="the second worker's raylet")
        victim = wait_running_child(stack, experiment, on_nodes=lambda: stack.trial_nodes(killed))
        killed_node = victim.data.tags["node.id"]
        sh(stack.docker, "kill", killed)
        # The operator's (or the restart policy's) replacement: the service is back at 2 workers.
        stack.compose("up", "-d", "--no-recreate", "--scale", f"{WORKER}=2", WORKER)
        proc.wait(timeout=600)
    finally:
        stop(proc)
    output = (stack.tmp / f"{experiment}.log").read_text()
    assert proc.returncode == 0, output[-4000:]
    children = assert_one_finished_run_per_point(stack, experiment, 8)
    rerun = next(r for r in children if r.data.tags["trial.key"] == victim.data.tags["trial.key"])
    attempt = victim.data.tags["attempt"]
    assert int(rerun.data.tags["attempt"]) > int(attempt) and rerun.data.tags["node.id"] != killed_node
    # The lost attempt stays among the deleted runs, tagged with the node that died.
    lost = [r for r in child_runs(stack.mlflow_uri, experiment, deleted=True)
            if r.data.tags.get("trial.key") == victim.data.tags["trial.key"]]
    assert any(r.data.tags.get("attempt") == attempt and r.data.tags.get("node.id") == killed_node for r in lost)
    # the scaled-up worker took trials: at least the lost attempt (whether a finished trial also lands on
    # its replacement depends on timing), so count the nodes of finished and lost runs together
    nodes = {r.data.tags["node.id"] for r in children} | {r.data.tags.get("node.id") for r in lost}
    assert len(nodes) >= 2, f"trials ran on {nodes}: the scaled-up worker took none"
    assert_no_metric_record_lost(stack, experiment, 8, SLOW_STEPS, SLOW_EVERY)
    print(f"killed {killed[:12]} (node {killed_node[:8]}) mid-trial; trial {rerun.data.tags['trial.key']} "
          f"rerun as attempt {rerun.data.tags['attempt']}; trials on {len(nodes)} nodes")


def test_mlflow_container_stopped_mid_sweep_loses_no_metric(stack):
    experiment = "cluster-outage"
    proc = stack.sweep(experiment, *SLOW)
    try:
        wait_running_child(stack, experiment, finished_first=True)
        assert proc.poll() is None, "the sweep ended before the outage"
        down = time.monotonic()
        stack.compose("stop", "--timeout", "5", "mlflow")
        time.sleep(10)
        assert proc.poll() is None, "the sweep must keep running while tracking is down"
        stack.compose("start", "mlflow")
        outage = time.monotonic() - down
        proc.wait(timeout=600)
    finally:
        stop(proc)
    output = (stack.tmp / f"{experiment}.log").read_text()
    assert proc.returncode == 0, output[-4000:]
    assert "tracking lost" not in output
    wait_for(stack.healthy, timeout=120, interval=1, what="mlflow healthy again")
    assert_one_finished_run_per_point(stack, experiment, 8)
    counted = assert_no_metric_record_lost(stack, experiment, 8, SLOW_STEPS, SLOW_EVERY)
    print(f"mlflow down {outage:.1f}s; {counted} evaluation records counted in PostgreSQL, none lost")


def test_only_the_loopback_ports_answer_and_ray_wants_the_token(stack):
    ids = stack.containers()
    published = {}
    for c in stack.inspect(*ids):
        service = c["Config"]["Labels"]["com.docker.compose.service"]
        for port, bindings in (c["NetworkSettings"]["Ports"] or {}).items():
            for b in bindings or []:
                published.setdefault(service, []).append((port, b["HostIp"], int(b["HostPort"])))
    assert published == {"mlflow": [("5000/tcp", "127.0.0.1", stack.mlflow_port)],
                         "ray-head": [("8265/tcp", "127.0.0.1", stack.dash_port)]}, published
    # What actually listens on the host for these containers: Docker's proxy, on those two ports only.
    ips = {n["IPAddress"] for c in stack.inspect(*ids) for n in c["NetworkSettings"]["Networks"].values()}
    listening = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"docker-proxy"):
            a = [x.decode() for x in args]
            opt = lambda name: a[a.index(name) + 1] if name in a else None  # noqa: E731
            if opt("-container-ip") in ips:
                listening.add((opt("-host-ip"), int(opt("-host-port")), opt("-container-port")))
    assert listening <= {("127.0.0.1", stack.mlflow_port, "5000"), ("127.0.0.1", stack.dash_port, "8265")}, listening
    # The two published ports answer on loopback.
    with urllib.request.urlopen(f"{stack.mlflow_uri}/health", timeout=30) as r:
        assert r.status == 200
    # Ray's dashboard and job submission refuse a caller without the token (401) or with a wrong one (403).
    job = {"entrypoint": "echo should-never-run"}
    assert stack.dashboard("/api/jobs/")[0] == 401
    assert stack.dashboard("/api/jobs/", data=job)[0] == 401
    assert stack.dashboard("/api/jobs/", token="not-the-token", data=job)[0] == 403
    assert stack.dashboard("/api/v0/nodes")[0] == 401
    assert stack.dashboard("/api/jobs/", token=stack.token)[0] == 200
    # PostgreSQL: only MLflow's network reaches it; the Ray containers cannot even resolve it.
    probe = ("import socket, sys\ntry:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), 5).close()\n"
             "    print('open')\nexcept OSError as e:\n    print('refused', type(e).__name__)")
    assert stack.exec("mlflow", "python", "-c", probe, "postgres", "5432").stdout.split()[0] == "open"
    for service in ("ray-head", WORKER):
        assert stack.exec(service, "python", "-c", probe, "postgres", "5432").stdout.split()[0] == "refused"
    # Ray's GCS: unpublished (above); on the cluster network a wrong token is refused.
    bad = stack.exec(WORKER, "ray", "health-check", "--address=ray-head:6379", check=False, timeout=90,
                     env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert bad.returncode != 0 and "InvalidAuthToken" in bad.stdout + bad.stderr, bad.stderr[-1000:]
    good = stack.exec(WORKER, "ray", "health-check", "--address=ray-head:6379", check=False, timeout=90)
    assert good.returncode == 0, good.stderr[-1000:]


def test_down_v_leaves_no_container_network_or_volume(stack):
    assert stack.leftovers()["volumes"], "the stack has its named volumes while up"
    stack.down()
    assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}
