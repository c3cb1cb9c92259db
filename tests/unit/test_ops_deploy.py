"""The AWS deployment path, checked without AWS: the ECS templates against their schema and against the web image
(port, user, health check, settings), scripts/push-images --dry-run, and the images' labels and portability."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest

from infinite_chat.config import Settings
from infinite_chat.server import hypercorn_config

ROOT = Path(__file__).resolve().parents[2]
ECS = ROOT / "deploy" / "ecs"
WEB_DOCKERFILE = ROOT / "services" / "web" / "Dockerfile"
IMAGES = ("web", "nginx", "redis", "prometheus")

# Settings the replica reads that the task definition deliberately does not set, and why.
LEFT_TO_DEFAULTS = {
    "REPLICA_NAME": "each task's own hostname names it; one task definition serves every task",
    "REDIS_PASSWORD_FILE": "the password comes from Secrets Manager or SSM as REDIS_PASSWORD (secrets)",
    "REDIS_CA_FILE": "ElastiCache's certificates chain to public CAs that the image's ca-certificates trusts",
    "REDIS_SENTINELS": "ElastiCache fails over by itself and moves its endpoint's name: no Sentinel on AWS",
    "REDIS_SENTINEL_MASTER": "the same: only with REDIS_SENTINELS",
    # Signing in (docs/sign-in.md): off unless configured, and the join does not use it yet.
    "AUTH_MODE": "defaults to names (owned names): nobody signs in until a deployment chooses jwt or alb",
    "MODERATOR_TOKENS": "no moderators until the operator adds their digests (or AUTH_MODERATOR_CLAIM when signed in)",
    "MODERATOR_TOKENS_FILE": "no moderators until the operator adds their digests (a file of them)",
    "AUTH_JWT_SECRET": "only with AUTH_MODE jwt or alb; AUTH_MODE defaults to names",
    "AUTH_JWT_SECRET_FILE": "only with AUTH_MODE jwt or alb; AUTH_MODE defaults to names",
    "AUTH_JWKS_FILE": "only with AUTH_MODE jwt or alb; AUTH_MODE defaults to names",
    "AUTH_JWKS_URL": "only with AUTH_MODE jwt or alb; AUTH_MODE defaults to names",
    "AUTH_ISSUER": "only with AUTH_MODE jwt or alb; AUTH_MODE defaults to names",
    "AUTH_AUDIENCE": "only with AUTH_MODE jwt or alb; AUTH_MODE defaults to names",
    "AUTH_LEEWAY_SECONDS": "only with AUTH_MODE jwt or alb; AUTH_MODE defaults to names",
    "AUTH_NAME_CLAIM": "only with AUTH_MODE jwt or alb; AUTH_MODE defaults to names",
    "AUTH_MODERATOR_CLAIM": "only with AUTH_MODE jwt or alb; AUTH_MODE defaults to names",
    "AUTH_MODERATOR_VALUE": "only with AUTH_MODE jwt or alb; AUTH_MODE defaults to names",
    "AUTH_ALB_ARN": "only with AUTH_MODE jwt or alb; AUTH_MODE defaults to names",
    "AUTH_ALB_REGION": "only with AUTH_MODE jwt or alb; AUTH_MODE defaults to names",
    "AUTH_ALB_KEYS_URL": "only with AUTH_MODE jwt or alb; AUTH_MODE defaults to names",
}

SAMPLE_VALUES = {
    "WEB_IMAGE": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/infinite-chat/web:0123456789ab",
    "AWS_REGION": "eu-west-1",
    "LOG_GROUP": "/ecs/infinite-chat",
    "REDIS_ENDPOINT": "master.chat.abc123.euw1.cache.amazonaws.com:6379",
    "REDIS_CLUSTER": "false",
    "REDIS_PASSWORD_SECRET_ARN": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:infinite-chat/redis-AbCdEf",
    "EXECUTION_ROLE_ARN": "arn:aws:iam::123456789012:role/infinite-chat-execution",
    "CPU_ARCHITECTURE": "ARM64",
    "CLUSTER": "infinite-chat",
    "TARGET_GROUP_ARN": "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/chat/0123456789abcdef",
    "SUBNET_1": "subnet-0123456789abcdef0",
    "SUBNET_2": "subnet-0123456789abcdef1",
    "WEB_SECURITY_GROUP": "sg-0123456789abcdef0",
}


def load_render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ecs_render", ECS / "render.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def task() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ECS / "task-definition.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def web(task: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = task["containerDefinitions"][0]
    return container


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ECS / "task-definition.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(loaded)
    return loaded


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, rest = pending.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def dockerfile_values(keyword: str, path: Path = WEB_DOCKERFILE) -> list[str]:
    return [rest for name, rest in dockerfile_instructions(path) if name == keyword]


def settings_read() -> set[str]:
    """Every environment variable Settings.from_env looks at, found by asking it rather than by reading its code."""

    class Recording(Mapping[str, str]):
        def __init__(self) -> None:
            self.asked: set[str] = set()

        def __getitem__(self, key: str) -> str:
            self.asked.add(key)
            raise KeyError(key)

        def get(self, key: str, default: Any = None) -> Any:
            self.asked.add(key)
            return default

        def __iter__(self) -> Iterator[str]:
            return iter(())

        def __len__(self) -> int:
            return 0

    recording = Recording()
    Settings.from_env(recording)
    return recording.asked


def test_task_definition_template_matches_its_schema(task: dict[str, Any], schema: dict[str, Any]) -> None:
    jsonschema.validate(task, schema)


def test_the_schema_refuses_what_ecs_would(task: dict[str, Any], schema: dict[str, Any]) -> None:
    """The schema has teeth: typical mistakes in the template fail validation."""
    mistakes: list[tuple[str, Any]] = [
        ("healthcheck", {"command": ["CMD", "true"]}),  # misspelt key: ECS would ignore it, silently
        ("user", "0"),  # root
        ("stopTimeout", 600),  # above Fargate's 120 s
        ("readonlyRootFilesystem", False),
    ]
    for key, value in mistakes:
        broken = json.loads(json.dumps(task))
        broken["containerDefinitions"][0][key] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_rendering_fills_every_placeholder_and_keeps_shell_expressions(schema: dict[str, Any]) -> None:
    render = load_render()
    template = (ECS / "task-definition.json").read_text()
    rendered = json.loads(render.render(template, SAMPLE_VALUES))
    jsonschema.validate(rendered, schema)
    assert not render.placeholders(json.dumps(rendered))
    web = rendered["containerDefinitions"][0]
    assert web["image"] == SAMPLE_VALUES["WEB_IMAGE"]
    env = {item["name"]: item["value"] for item in web["environment"]}
    assert env["REDIS_URL"] == f"rediss://{SAMPLE_VALUES['REDIS_ENDPOINT']}/0"
    # The health check's own ${PORT:-8000} is bash's business, not a placeholder.
    assert "${PORT:-8000}" in web["healthCheck"]["command"][-1]
    with pytest.raises(render.MissingValues, match="WEB_IMAGE"):
        render.render(template, {k: v for k, v in SAMPLE_VALUES.items() if k != "WEB_IMAGE"})


def test_render_script_refuses_missing_values_and_writes_json() -> None:
    script = ECS / "render.py"
    template = ECS / "task-definition.json"
    bare = subprocess.run(
        ["python3", str(script), str(template)], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True
    )
    assert bare.returncode == 1
    assert "WEB_IMAGE" in bare.stderr
    assert bare.stdout == ""
    filled = subprocess.run(
        ["python3", str(script), str(template)],
        env={"PATH": os.environ["PATH"], **SAMPLE_VALUES},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(filled.stdout)["containerDefinitions"][0]["image"] == SAMPLE_VALUES["WEB_IMAGE"]


def test_container_port_is_the_images(web: dict[str, Any]) -> None:
    exposed = dockerfile_values("EXPOSE")
    assert exposed == ["8000"]
    env_lines = " ".join(dockerfile_values("ENV"))
    assert re.search(r"\bPORT=(\d+)", env_lines) is not None
    image_port = int(re.search(r"\bPORT=(\d+)", env_lines).group(1))  # type: ignore[union-attr]
    assert [m["containerPort"] for m in web["portMappings"]] == [int(exposed[0])] == [image_port]
    env = {item["name"]: item["value"] for item in web["environment"]}
    assert int(env.get("PORT", image_port)) == image_port
    service = json.loads((ECS / "service.json").read_text())
    assert service["loadBalancers"][0]["containerPort"] == image_port
    assert service["loadBalancers"][0]["containerName"] == web["name"]


def test_health_check_is_the_images(web: dict[str, Any]) -> None:
    [healthcheck] = dockerfile_values("HEALTHCHECK")
    options = dict(re.findall(r"--([a-z-]+)=(\S+)", healthcheck))
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    check = web["healthCheck"]
    assert check["command"] == ["CMD", *command]
    seconds = {name: int(value.rstrip("s")) for name, value in options.items()}
    assert check["interval"] == seconds["interval"]
    assert check["timeout"] == seconds["timeout"]
    assert check["startPeriod"] == seconds["start-period"]
    assert check["retries"] == seconds["retries"]


def test_runs_as_the_images_non_root_user_with_a_read_only_root(web: dict[str, Any], task: dict[str, Any]) -> None:
    [user] = dockerfile_values("USER")
    assert web["user"] == user
    assert user.split(":")[0] not in ("0", "root")
    assert web["readonlyRootFilesystem"] is True
    # /tmp is the one writable place the replica has under Compose (tmpfs); here it is a task volume.
    assert {"sourceVolume": "tmp", "containerPath": "/tmp", "readOnly": False} in web["mountPoints"]
    assert {"name": "tmp"} in task["volumes"]
    assert web["linuxParameters"]["capabilities"]["drop"] == ["ALL"]


def test_every_variable_set_is_one_the_replica_reads(web: dict[str, Any]) -> None:
    read = settings_read()
    environment = {item["name"] for item in web["environment"]}
    secrets = {item["name"] for item in web["secrets"]}
    assert environment <= read, f"set but never read: {environment - read}"
    assert secrets <= read, f"secret never read: {secrets - read}"
    assert secrets == {"REDIS_PASSWORD"}
    assert not environment & secrets
    # And every setting is either given or deliberately left out (with a reason above).
    assert read - environment - secrets == set(LEFT_TO_DEFAULTS)


def test_the_values_set_are_accepted_by_the_replica(web: dict[str, Any]) -> None:
    env = {item["name"]: item["value"] for item in web["environment"]}
    env["REDIS_ENDPOINT"] = SAMPLE_VALUES["REDIS_ENDPOINT"]
    env["REDIS_URL"] = env["REDIS_URL"].replace("${REDIS_ENDPOINT}", SAMPLE_VALUES["REDIS_ENDPOINT"])
    env["REDIS_CLUSTER"] = SAMPLE_VALUES["REDIS_CLUSTER"]
    settings = Settings.from_env({**env, "REDIS_PASSWORD": "from-secrets-manager"})
    assert settings.redis_url is not None
    assert settings.redis_url.startswith("rediss://")
    # They are the defaults: a task on AWS behaves like a replica under Compose unless someone changes both.
    defaults = Settings()
    for name in ("history_size", "retain", "rate_limit", "outbox_limit", "presence_ttl", "ping_interval"):
        assert getattr(settings, name) == getattr(defaults, name), name


def test_stop_timeout_leaves_room_for_the_drain(web: dict[str, Any]) -> None:
    env = {item["name"]: item["value"] for item in web["environment"]}
    settings = Settings.from_env({k: v for k, v in env.items() if "${" not in v})
    # SIGTERM -> DRAIN_SECONDS of new sockets refused -> every socket closed with 1012, up to 5 s for the closes
    # (replica.drain) -> Hypercorn's graceful timeout. ECS sends SIGKILL at stopTimeout: it must come later.
    needed = settings.drain_seconds + 5 + float(hypercorn_config(settings).graceful_timeout)
    assert web["stopTimeout"] >= needed + 5


def test_logs_go_to_cloudwatch(web: dict[str, Any]) -> None:
    logging = web["logConfiguration"]
    assert logging["logDriver"] == "awslogs"
    assert logging["options"]["awslogs-group"] == "${LOG_GROUP}"
    assert logging["options"]["awslogs-region"] == "${AWS_REGION}"


def test_service_template_rolls_out_without_losing_capacity(task: dict[str, Any]) -> None:
    render = load_render()
    service = json.loads(render.render((ECS / "service.json").read_text(), SAMPLE_VALUES))
    assert service["taskDefinition"] == task["family"]
    deployment = service["deploymentConfiguration"]
    # New tasks start and turn healthy before old ones stop: a rolling restart, as under Compose.
    assert deployment["minimumHealthyPercent"] == 100
    assert deployment["maximumPercent"] >= 200
    assert service["desiredCount"] >= 2


# --- images -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image", IMAGES)
def test_images_carry_oci_labels_from_build_args(image: str) -> None:
    path = ROOT / "services" / image / "Dockerfile"
    labels = " ".join(dockerfile_values("LABEL", path))
    for label, arg in (("source", "SOURCE"), ("revision", "REVISION"), ("version", "VERSION")):
        assert f'org.opencontainers.image.{label}="${{{arg}}}"' in labels, f"{image}: {label}"
    args = dockerfile_values("ARG", path)
    assert {"VERSION=dev", "REVISION=unknown"} <= set(args)
    assert any(arg.startswith("BASE_IMAGE=") for arg in args)


@pytest.mark.parametrize("image", IMAGES)
def test_images_have_nothing_tied_to_one_cpu_architecture(image: str) -> None:
    path = ROOT / "services" / image / "Dockerfile"
    text = path.read_text().lower()
    for word in ("amd64", "x86_64", "x86-64", "i386", "aarch64", "arm64", "--platform"):
        assert word not in text, f"{image}: {word}"
    # Every stage starts from the one base image, which is multi-architecture on Docker Hub.
    assert all(rest.split()[0] == "${BASE_IMAGE}" for rest in dockerfile_values("FROM", path))
    [user] = dockerfile_values("USER", path)
    assert user.split(":")[0] not in ("0", "root")


def test_compose_passes_the_revision_and_version_to_every_build() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "REVISION: ${GIT_REVISION:-unknown}" in compose
    assert "VERSION: ${IMAGE_VERSION:-dev}" in compose
    # Every build passes them (the redis image is built by the standalone redis and by the cluster's first node).
    builds = [line for line in compose.splitlines() if line.strip() == "build:"]
    assert compose.count("args: *build-args") == len(builds)
    assert {f"context: services/{image}" for image in IMAGES} <= {line.strip() for line in compose.splitlines()}
    assert "export GIT_REVISION" in (ROOT / "scripts" / "up").read_text()


# --- scripts/push-images ------------------------------------------------------------------------------------------

REGISTRY = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A git checkout of its own holding the script and the build contexts' Dockerfiles, so the test knows exactly
    which commit is checked out and whether the tree is clean (the shared working tree is neither)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "push-images", repo / "scripts" / "push-images")
    for image in IMAGES:
        (repo / "services" / image).mkdir(parents=True)
        shutil.copy2(ROOT / "services" / image / "Dockerfile", repo / "services" / image / "Dockerfile")
    shutil.copy2(ROOT / "services" / "web" / "pyproject.toml", repo / "services" / "web" / "pyproject.toml")
    (repo / "README.md").write_text("test checkout\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "test"], check=True)
    return repo


def commit_of(repo: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def push_images(repo: Path, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_trapped(repo / "scripts" / "push-images", tmp_path, *args, **env)


def run_trapped(script: Path, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs a script with `aws` and `docker` on PATH as traps that record any call (in tmp_path/called): a dry run
    makes none."""
    traps = tmp_path / "traps"
    traps.mkdir(exist_ok=True)
    for tool in ("aws", "docker"):
        trap = traps / tool
        trap.write_text(f'#!/bin/sh\necho "{tool} $*" >> {tmp_path}/called\nexit 99\n')
        trap.chmod(0o755)
    return subprocess.run(
        [str(script), *args],
        env={"PATH": f"{traps}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_push_images_dry_run_prints_every_command_and_runs_none(checkout: Path, tmp_path: Path) -> None:
    result = push_images(checkout, tmp_path, "--dry-run", "--registry", REGISTRY)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "called").exists(), (tmp_path / "called").read_text()
    commit = commit_of(checkout)
    tag = commit[:12]
    version = re.search(r'^version = "(.+)"$', (ROOT / "services/web/pyproject.toml").read_text(), re.M)
    assert version is not None
    login = "aws ecr get-login-password --region eu-west-1 | docker login --username AWS --password-stdin"
    expected = [f"{login} {REGISTRY}"]
    for image in ("web", "nginx", "redis"):
        expected += [
            f"docker build --build-arg BASE_IMAGE=debian:bookworm-slim --build-arg VERSION={version.group(1)} "
            f"--build-arg REVISION={commit} --tag {REGISTRY}/infinite-chat/{image}:{tag} services/{image}",
            f"docker push {REGISTRY}/infinite-chat/{image}:{tag}",
        ]
    assert result.stdout.splitlines() == expected


def test_push_images_dry_run_for_several_architectures(checkout: Path, tmp_path: Path) -> None:
    result = push_images(
        checkout,
        tmp_path,
        "--dry-run",
        "--region",
        "us-east-1",
        "--platform",
        "linux/amd64,linux/arm64",
        "--with-prometheus",
        AWS_ACCOUNT_ID="111122223333",
    )
    assert result.returncode == 0, result.stderr
    registry = "111122223333.dkr.ecr.us-east-1.amazonaws.com"
    lines = result.stdout.splitlines()
    assert lines[0].endswith(f"--password-stdin {registry}")
    tag = commit_of(checkout)[:12]
    builds = lines[1:]
    assert [line.split()[-1] for line in builds] == [f"services/{image}" for image in IMAGES]
    for line, image in zip(builds, IMAGES, strict=True):
        assert line.startswith("docker buildx build --platform linux/amd64,linux/arm64 ")
        assert f"--tag {registry}/infinite-chat/{image}:{tag} --push " in line


def test_push_images_refuses_uncommitted_sources_unless_told(checkout: Path, tmp_path: Path) -> None:
    tag = commit_of(checkout)[:12]
    # A change outside the build contexts does not change an image: still the plain commit tag.
    (checkout / "README.md").write_text("edited\n")
    clean = push_images(checkout, tmp_path, "--dry-run", "--registry", REGISTRY)
    assert clean.returncode == 0, clean.stderr
    assert f"/infinite-chat/web:{tag} " in clean.stdout
    (checkout / "services" / "web" / "Dockerfile").write_text("FROM ${BASE_IMAGE}\n")
    refused = push_images(checkout, tmp_path, "--dry-run", "--registry", REGISTRY)
    assert refused.returncode == 1
    assert "uncommitted changes" in refused.stderr
    assert refused.stdout == ""
    allowed = push_images(checkout, tmp_path, "--dry-run", "--registry", REGISTRY, "--allow-dirty")
    assert allowed.returncode == 0, allowed.stderr
    assert f"/infinite-chat/web:{tag}-dirty " in allowed.stdout


def test_push_images_dry_run_needs_to_be_told_the_registry(checkout: Path, tmp_path: Path) -> None:
    result = push_images(checkout, tmp_path, "--dry-run", "--region", "eu-west-1")
    assert result.returncode == 1
    assert "--registry" in result.stderr
    assert not (tmp_path / "called").exists()


# --- docs/operations.md -------------------------------------------------------------------------------------------


def test_configuration_table_covers_every_variable() -> None:
    """Every variable the replica, Compose, .env.example or nginx's entry point reads has a row in the docs."""
    docs = (ROOT / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", docs, re.M))
    compose = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (ROOT / "docker-compose.yml").read_text()))
    example = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M))
    watch = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):-", (ROOT / "services/nginx/upstream-watch.sh").read_text()))
    for source, names in (("config.py", settings_read()), ("compose", compose), (".env.example", example)):
        assert names <= documented, f"{source}: not in docs/operations.md: {sorted(names - documented)}"
    assert watch <= documented, f"upstream-watch: {sorted(watch - documented)}"


def test_compose_passes_every_web_setting_but_the_documented_few() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    web = compose.split("\n  web:\n", 1)[1].split("\n  nginx:\n", 1)[0]
    environment = web.split("    environment:\n", 1)[1].split("\n    ulimits:", 1)[0]
    passed = set(re.findall(r"^      ([A-Z][A-Z0-9_]*):", environment, re.M))
    assert passed <= settings_read()
    not_passed = {
        "PORT",
        "REPLICA_NAME",
        "REDIS_CA_FILE",
        "REDIS_PASSWORD_FILE",
        "MAX_FRAME_BYTES",
        # Set by docker-compose.ha.yml, for the HA profile only.
        "REDIS_SENTINELS",
        "REDIS_SENTINEL_MASTER",
    }
    assert settings_read() - passed == not_passed
    # The docs name exactly these (and REDIS_URL, which Compose sets to its own Redis rather than from .env).
    docs = (ROOT / "docs" / "operations.md").read_text()
    sentence = re.search(r"can be set in `\.env` except (.+?), which", docs, re.S)
    assert sentence is not None
    assert set(re.findall(r"`([A-Z_]+)`", sentence.group(1))) == not_passed | {"REDIS_URL"}
