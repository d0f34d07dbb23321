"""The Compose cluster's files obey the security rules of issue 5, and Compose itself accepts them.

Fast checks of the files, without an engine: parsed here (the rules below), and validated by Debian's
`docker-compose config -q` (installed by .ci/run; its absence is a failure in CI and a skip elsewhere).
Each rule is checked on what Compose would actually run: the files merged the way
`docker compose -f compose.yaml -f compose.cpu.yaml` merges them. tests/test_docker_stack.py builds
and runs the stack on a real engine.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BASE = DOCKER / "compose.yaml"
CPU = DOCKER / "compose.cpu.yaml"
AUTH = DOCKER / "compose.auth.yaml"
OFFLINE = DOCKER / "compose.offline.yaml"
AUTH_INI = DOCKER / "mlflow-basic-auth.ini"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILE = DOCKER / "Dockerfile"
GCS_PORT = 6379
POSTGRES_PORT = 5432
SECRETS = ("RAY_AUTH_TOKEN", "POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
# Values that stand in for the secrets when Compose validates the files (never real ones).
DUMMY_ENV = {name: f"dummy-{name.lower()}-for-validation" for name in SECRETS} | {"BASE_IMAGE": "local/debian:bookworm"}
# Keys whose value an override replaces instead of extending (Compose's merge rules).
REPLACED = ("command", "entrypoint", "test")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def merge(base, override):
    """Compose's merge rule for these files: mappings merge key by key, lists append (except the
    REPLACED keys), scalars replace."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base[key], value) if key in base and key not in REPLACED else value
        return out
    if isinstance(base, list) and isinstance(override, list):
        return base + override
    return override


def services(*paths: Path) -> dict:
    config: dict = {}
    for path in paths:
        config = merge(config, load(path))
    return config["services"]


STACKS = {"gpu": (BASE,), "cpu": (BASE, CPU), "auth": (BASE, AUTH), "offline": (BASE, CPU, OFFLINE)}


def active(svcs: dict, profiles=()) -> dict:
    """The services `up` starts when the given profiles are enabled."""
    return {n: s for n, s in svcs.items() if not s.get("profiles") or set(s["profiles"]) & set(profiles)}


def published(port) -> tuple[str | None, str]:
    """(host_ip, container port) of one `ports:` entry, short or long syntax."""
    if isinstance(port, dict):
        return port.get("host_ip"), str(port["target"])
    parts = re.sub(r"\$\{[^}]*\}", "HOSTPORT", str(port)).split(":")
    container = parts[-1].split("/")[0]
    if len(parts) == 3:
        return parts[0], container
    return None, container  # "HOST:CONTAINER" or "CONTAINER": all interfaces


def env_of(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def command_of(service: dict) -> str:
    parts = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        parts.extend(value if isinstance(value, list) else [value])
    return " ".join(map(str, parts))


def runs_ray(service: dict) -> bool:
    return "ray start" in command_of(service)


def bytes_of(size: str) -> float:
    size = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(size)).strip().lower()  # take the default
    number, unit = re.fullmatch(r"([\d.]+)\s*([kmg]?)b?", size).groups()
    return float(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit]


@pytest.mark.parametrize("stack", STACKS)
def test_published_ports_bind_loopback_only(stack):
    svcs = services(*STACKS[stack])
    seen = []
    for name, svc in svcs.items():
        assert svc.get("network_mode") != "host", f"{name} uses the host network: it would publish every port"
        for port in svc.get("ports", []):
            host_ip, container = published(port)
            assert host_ip == "127.0.0.1", f"{name} publishes {port!r} beyond loopback"
            seen.append((name, container))
    # Exactly the two UIs, nothing else.
    assert sorted(seen) == [("mlflow", "5000"), ("ray-head", "8265")]


@pytest.mark.parametrize("stack", STACKS)
def test_postgres_and_ray_gcs_are_never_published(stack):
    svcs = services(*STACKS[stack])
    head = command_of(svcs["ray-head"])
    assert f"--port={GCS_PORT}" in head
    for name, svc in svcs.items():
        containers = {published(p)[1] for p in svc.get("ports", [])}
        assert str(GCS_PORT) not in containers and str(POSTGRES_PORT) not in containers, name
    assert "ports" not in svcs["postgres"]
    # PostgreSQL sits only on the internal network, which only MLflow shares.
    networks = load(BASE)["networks"]
    assert svcs["postgres"]["networks"] == ["backend"] and networks["backend"]["internal"] is True
    on_backend = sorted(n for n, s in svcs.items() if "backend" in (s.get("networks") or []))
    assert on_backend == ["mlflow", "postgres"]


@pytest.mark.parametrize("stack", STACKS)
def test_every_ray_process_requires_the_token_from_env(stack):
    ray_services = {n: s for n, s in services(*STACKS[stack]).items() if runs_ray(s)}
    assert {"ray-head", "ray-worker", "sweep"} <= set(ray_services)
    for name, svc in ray_services.items():
        env = env_of(svc)
        assert env.get("RAY_AUTH_MODE") == "token", name
        assert env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "1", f"{name}: containers are separate nodes"
        # Taken from docker/.env, required (":?"), never a literal.
        assert re.fullmatch(r"\$\{RAY_AUTH_TOKEN:\?[^}]+\}", env.get("RAY_AUTH_TOKEN", "")), name


def test_gpu_worker_reserves_gpus_and_shared_memory():
    svcs = services(BASE)
    worker = svcs["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    assert bytes_of(worker["shm_size"]) >= 2**30, "Ray's object store lives in /dev/shm"
    assert "replicas" not in worker.get("deploy", {}) and "container_name" not in worker, "must scale with --scale"
    assert "profiles" not in worker, "the GPU worker starts with a plain `up`"
    # The head schedules no trials: zero CPUs and GPUs for Ray.
    head = command_of(svcs["ray-head"])
    assert "--head" in head and "--block" in head and "--num-cpus=0" in head and "--num-gpus=0" in head
    assert "--address=ray-head:6379" in command_of(worker) and "--block" in command_of(worker)


def test_cpu_override_parks_the_gpu_worker_and_adds_a_cpu_one():
    cpu = services(BASE, CPU)
    started = active(cpu)
    assert "ray-worker" not in started, "a GPU reservation fails on a machine without NVIDIA runtime"
    worker = started["ray-worker-cpu"]
    assert "deploy" not in worker and "--num-gpus=0" in command_of(worker)
    assert "--address=ray-head:6379" in command_of(worker)
    assert bytes_of(worker["shm_size"]) >= 2**30
    for name, svc in started.items():
        assert "deploy" not in svc or "devices" not in str(svc["deploy"]), f"{name} still asks for a GPU"
    # The CPU wheel by name, so a missing CPU index fails the build instead of taking the CUDA build;
    # PyTorch's CPU index unless TORCH_INDEX_URL is set (empty: docker/local/wheels/, then PyPI).
    for name in ("ray-head", "sweep", "ray-worker-cpu"):
        args = cpu[name]["build"]["args"]
        assert args["TORCH_SPEC"] == "torch==2.13.0+cpu", name
        assert args["TORCH_INDEX_URL"] == "${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}", name
    # The GPU stack starts the GPU worker and not the CPU one.
    assert set(active(services(BASE))) == {"postgres", "mlflow", "ray-head", "ray-worker"}


def test_every_image_builds_from_base_image_and_offline_builds_postgres_too():
    """One BASE_IMAGE (docker/.env) for every image built; the usual upstream images by default."""
    default = "${BASE_IMAGE:-python:3.11-slim-bookworm}"
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in DOCKERFILE.read_text().splitlines()
    for stack in ("gpu", "cpu", "auth"):
        svcs = services(*STACKS[stack])
        assert svcs["postgres"]["image"] == "postgres:16-bookworm" and "build" not in svcs["postgres"]
        for name, svc in svcs.items():
            if "build" in svc:
                assert svc["build"]["args"]["BASE_IMAGE"] == default, (stack, name)
    offline = services(*STACKS["offline"])["postgres"]
    assert offline["build"]["dockerfile"] == "docker/postgres.Dockerfile"
    assert offline["image"].startswith("curvature-sweep-postgres:")
    assert offline["build"]["args"]["BASE_IMAGE"].startswith("${BASE_IMAGE:?set BASE_IMAGE in docker/.env")
    # The offline PostgreSQL keeps the official image's contract that compose.yaml relies on.
    entry = (DOCKER / "postgres-entrypoint.sh").read_text()
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "PGDATA"):
        assert name in entry, name
    assert "scram-sha-256" in entry and "listen_addresses = '*'" in entry
    assert "!docker/postgres-entrypoint.sh" in (ROOT / ".dockerignore").read_text().split()


def test_local_build_inputs_are_never_committed():
    """docker/local/ca and docker/local/wheels (CA certificates, wheels) reach the build, never git."""
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "!docker/local/ca" in ignore and "!docker/local/wheels" in ignore
    text = DOCKERFILE.read_text()
    assert "COPY docker/local/ca/ /usr/local/share/ca-certificates/" in text and "update-ca-certificates" in text
    assert "PIP_CERT=/etc/ssl/certs/ca-certificates.crt" in text
    if (ROOT / ".git").exists() and shutil.which("git"):
        for path in ("docker/local/ca/proxy.crt", "docker/local/wheels/torch-2.13.0+cpu-cp311-cp311-x.whl"):
            assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
        tracked = subprocess.run(["git", "ls-files", "docker/local"], cwd=ROOT, capture_output=True, text=True)
        assert set(tracked.stdout.split()) <= {"docker/local/README.md", "docker/local/ca/.gitkeep",
                                               "docker/local/wheels/.gitkeep"}, tracked.stdout


@pytest.mark.parametrize("stack", STACKS)
def test_services_stateful_parts_live_in_named_volumes(stack):
    svcs = services(*STACKS[stack])
    volumes = load(BASE)["volumes"]
    assert "pgdata:/var/lib/postgresql/data" in svcs["postgres"]["volumes"]
    assert set(volumes) >= {"pgdata", "mlartifacts"}
    assert "pg_isready" in " ".join(svcs["postgres"]["healthcheck"]["test"])
    mlflow = svcs["mlflow"]
    cmd = command_of(mlflow)
    assert "--serve-artifacts" in cmd and "--artifacts-destination=/mlflow/artifacts" in cmd
    assert "mlartifacts:/mlflow/artifacts" in mlflow["volumes"]
    assert "--workers=1" in cmd and env_of(mlflow)["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    allowed = re.search(r"--allowed-hosts=(\S+)", cmd).group(1).split(",")
    assert "mlflow:5000" in allowed and "127.0.0.1:*" in allowed and "*" not in allowed
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    assert env_of(mlflow)["MLFLOW_BACKEND_STORE_URI"].startswith(
        "postgresql+psycopg2://mlflow:${POSTGRES_PASSWORD:?") and "@postgres:5432/mlflow" in env_of(mlflow)["MLFLOW_BACKEND_STORE_URI"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_sweep_service_runs_the_cli_against_the_cluster():
    sweep = services(BASE)["sweep"]
    assert sweep["profiles"] == ["sweep"]
    cmd = command_of(sweep)
    assert "python -m sweep cluster=remote tracking=server" in cmd
    assert "cluster.address=ray-head:6379" in cmd and "tracking.uri=http://mlflow:5000" in cmd
    assert '"$$@"' in cmd, "arguments of `compose run --rm sweep ...` must reach Hydra"
    assert sweep["command"] == ["+experiment=mnist_gain"]
    # The Hydra options the command names exist.
    assert (ROOT / "conf/cluster/remote.yaml").exists() and (ROOT / "conf/tracking/server.yaml").exists()


def test_auth_override_turns_on_mlflow_basic_auth():
    svcs = services(BASE, AUTH)
    mlflow, sweep = svcs["mlflow"], svcs["sweep"]
    cmd = command_of(mlflow)
    assert cmd.count("mlflow server") == 1 and "--app-name=basic-auth" in cmd, "the command is replaced, not appended"
    assert "--workers=1" in cmd and "127.0.0.1:*" in cmd
    env = env_of(mlflow)
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/mlflow/basic_auth.ini"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${MLFLOW_FLASK_SERVER_SECRET_KEY:?")
    assert "MLFLOW_BACKEND_STORE_URI" in env, "the base settings stay"
    assert "./mlflow-basic-auth.ini:/mlflow/basic_auth.ini:ro" in mlflow["volumes"]
    assert env_of(sweep)["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert env_of(sweep)["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_AUTH_ADMIN_USERNAME"] == "admin"
    ini = AUTH_INI.read_text()
    assert "database_uri = sqlite:////mlflow/auth/basic_auth.db" in ini
    assert "mlflow-auth:/mlflow/auth" in mlflow["volumes"] and "mlflow-auth" in load(AUTH)["volumes"]
    assert "sed 's/^mlflow==/mlflow[auth]==/'" in DOCKERFILE.read_text(), "the image has mlflow's [auth] extra"


def test_no_secret_is_committed():
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#"))
    for name in SECRETS:
        assert example[name] == "", f"{ENV_EXAMPLE.name} must leave {name} empty"
    text = "\n".join(p.read_text() for p in (BASE, CPU, AUTH, OFFLINE, DOCKERFILE))
    for name in SECRETS:
        # Every assignment of a secret is an interpolation from docker/.env, never a value.
        for value in re.findall(rf"(?<![{{\w]){name}:\s*(\S+)", text):
            assert value.startswith("${" + name + ":?"), f"{name} is set to a literal: {value}"
    assert not re.search(r"postgresql(\+\w+)?://\w+:[^$@]+@", text), "a database password in a URI"
    assert not re.search(r"^\s*admin_password\s*=", AUTH_INI.read_text(), re.M), "it comes from docker/.env"
    assert "**/.env" in (ROOT / ".dockerignore").read_text().split()
    if (ROOT / ".git").exists() and shutil.which("git"):
        ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT)
        assert ignored.returncode == 0, "docker/.env must be git-ignored"


def stage(lines: list[str], name: str) -> list[str]:
    """The instructions of one build stage of the Dockerfile."""
    start = next(i for i, ln in enumerate(lines) if re.fullmatch(rf"FROM \S+ AS {name}", ln))
    end = next((i for i, ln in enumerate(lines) if i > start and ln.startswith("FROM ")), len(lines))
    return lines[start:end]


def test_dockerfile_installs_dependencies_before_sources_and_bakes_mnist():
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines()]
    torch, app = stage(lines, "torch"), stage(lines, "app")
    assert torch[0] == "FROM base AS torch" and app[0] == "FROM base AS app"
    assert any(ln.startswith('RUN pip install -q --find-links /tmp/wheels ${TORCH_INDEX_URL') for ln in torch)
    first = lambda prefix: next(i for i, ln in enumerate(app) if ln.startswith(prefix))  # noqa: E731
    torch_i, deps_i = first("COPY --from=torch /opt/venv /opt/venv"), first("RUN pip install -q -r /tmp/requirements.txt")
    bake_i, src_i = first("COPY trainers/data.py"), first("COPY sweep/")
    assert torch_i < deps_i < bake_i < src_i, "cache order: torch, dependencies, MNIST, sources"
    assert all(not ln.startswith("COPY") for ln in app[:torch_i]), "nothing copied before torch"
    assert app[deps_i - 1] == "COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt"
    # The wheels folder reaches only the torch stage: a wheel file never becomes a layer of the image.
    assert not any("docker/local/wheels" in ln for ln in app)
    # The torch pin matches the one `make` installs.
    make_pin = re.search(r"^TORCH_SPEC \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"ARG TORCH_SPEC={make_pin}" in torch
    assert "USER app" in app
    # PEP 668: installs go into the venv, which is on the PATH of every image built on `base`.
    base = stage(lines, "base")
    assert base[0] == "FROM ${BASE_IMAGE} AS base" and any("python3 -m venv /opt/venv" in ln for ln in base)
    assert any(ln.startswith("ENV PATH=/opt/venv/bin:$PATH") for ln in base)
    ignore = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ignore[0] == "*" and {"!pyproject.toml", "!sweep", "!trainers", "!conf"} <= set(ignore)


def test_dockerfile_bake_step_resolves_mnist(tmp_path):
    """Run the Dockerfile's own bake command the way the build does (data.py alone, empty cache)."""
    text = DOCKERFILE.read_text()
    code = re.search(r'python -c "(import data;[^"]+)"', text).group(1)
    shutil.copy(ROOT / "trainers/data.py", tmp_path / "data.py")
    env = {**os.environ, "CURVATURE_SWEEP_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(60000, 28, 28) (10000, 28, 28)" in out.stdout
    assert (tmp_path / "cache" / "mnist.npz").stat().st_size > 50e6


# ---------------------------------------------------------------- Compose's own validation
def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("docker-compose is missing in CI: .ci/run installs Debian's docker-compose")
        pytest.skip("docker-compose not installed (apt-get install docker-compose); CI always runs this")
    return exe


def compose(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([docker_compose(), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def clean_env(**extra) -> dict:
    # A developer's own docker/.env or shell secrets must not leak in: callers pass --env-file .env.example.
    env = {k: v for k, v in os.environ.items() if k not in DUMMY_ENV and not k.startswith("COMPOSE_")}
    return env | extra


@pytest.mark.parametrize("stack", STACKS)
def test_docker_compose_config_validates(stack):
    files = [a for p in STACKS[stack] for a in ("-f", str(p.relative_to(ROOT)))]
    out = compose(*files, "--env-file", str(ENV_EXAMPLE), "config", "-q", env=clean_env(**DUMMY_ENV))
    assert out.returncode == 0, out.stderr
    # What Compose resolves keeps the rules: ports on loopback, the GPU worker parked on CPU machines.
    resolved = yaml.safe_load(compose(*files, "--env-file", str(ENV_EXAMPLE), "config",
                                      env=clean_env(**DUMMY_ENV)).stdout)["services"]
    for name, svc in resolved.items():
        for port in svc.get("ports", []):
            assert published(port)[0] == "127.0.0.1", (name, port)
    assert ("gpu" in resolved["ray-worker"].get("profiles", [])) == (stack in ("cpu", "offline"))
    assert resolved["ray-head"]["environment"]["RAY_AUTH_TOKEN"] == DUMMY_ENV["RAY_AUTH_TOKEN"]


@pytest.mark.parametrize("stack,missing", [("gpu", "RAY_AUTH_TOKEN"), ("gpu", "POSTGRES_PASSWORD"),
                                           ("cpu", "RAY_AUTH_TOKEN"), ("auth", "MLFLOW_ADMIN_PASSWORD"),
                                           ("auth", "MLFLOW_FLASK_SERVER_SECRET_KEY"), ("offline", "BASE_IMAGE")])
def test_a_missing_secret_stops_compose_with_a_message_naming_it(stack, missing):
    env = clean_env(**{k: v for k, v in DUMMY_ENV.items() if k != missing})
    files = [a for p in STACKS[stack] for a in ("-f", str(p.relative_to(ROOT)))]
    out = compose(*files, "--env-file", str(ENV_EXAMPLE), "config", "-q", env=env)
    assert out.returncode != 0
    assert f"set {missing} in docker/.env" in out.stderr


def test_sweep_entrypoint_composes_the_remote_config(tmp_path):
    """Run the sweep service's own entrypoint script (ray start stubbed out, `--cfg job` so nothing
    starts): its Hydra overrides compose, and `compose run --rm sweep ARGS` arguments reach Hydra."""
    sweep = services(BASE)["sweep"]
    script = sweep["entrypoint"][2].replace("$$", "$")  # Compose's escape for a literal $
    assert script.startswith("ray start --address=ray-head:6379 --num-cpus=0 --num-gpus=0")
    script = "true" + script[script.index(" &&"):]  # no Ray here: the rest runs as written
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # this venv's python
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["/bin/sh", "-c", script, sweep["entrypoint"][3], "+experiment=smoke", "resources.gpu=0.25",
                          "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = yaml.safe_load(out.stdout)
    assert cfg["cluster"]["address"] == "ray-head:6379"
    assert cfg["tracking"]["uri"] == "http://mlflow:5000"
    assert cfg["name"] == "smoke" and cfg["resources"]["gpu"] == 0.25
