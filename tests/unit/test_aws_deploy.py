"""The AWS stack (deploy/aws/infinite-chat.yaml) and its one command (scripts/deploy-aws), checked without an AWS
account: cfn-lint and checkov pass (every finding suppressed in a file says why), the web container is the one
deploy/ecs/task-definition.json defines and the replica reads, the load balancer's timings fit the replica's, and a
dry run prints what a deployment would run. The scanners live in .venv-scan (scripts/ensure-scanners, which
scripts/test runs); without them these tests fail, they do not skip."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_ops_deploy import LEFT_TO_DEFAULTS, REGISTRY, commit_of, dockerfile_values, run_trapped, settings_read

from infinite_chat.config import Settings
from infinite_chat.server import hypercorn_config

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy" / "aws" / "infinite-chat.yaml"
SCANNERS = ROOT / ".venv-scan" / "bin"


def scanner(name: str) -> str:
    path = SCANNERS / name
    assert path.exists(), f"{path} is missing: run scripts/ensure-scanners (scripts/test does)"
    return str(path)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    """The template as data, read by cfn-lint's own YAML reader (it knows CloudFormation's short tags)."""
    read = subprocess.run(
        [
            scanner("python"),
            "-c",
            "import json, sys; from cfnlint.decode import cfn_yaml; print(json.dumps(cfn_yaml.load(sys.argv[1])))",
            str(TEMPLATE),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    loaded: dict[str, Any] = json.loads(read.stdout)
    return loaded


@pytest.fixture(scope="module")
def container(template: dict[str, Any]) -> dict[str, Any]:
    [web] = [c for c in template["Resources"]["Task"]["Properties"]["ContainerDefinitions"] if c["Name"] == "web"]
    assert isinstance(web, dict)
    return web


def properties(template: dict[str, Any], resource: str) -> dict[str, Any]:
    found: dict[str, Any] = template["Resources"][resource]["Properties"]
    return found


def attributes(template: dict[str, Any], resource: str, key: str) -> dict[str, str]:
    return {item["Key"]: item["Value"] for item in properties(template, resource)[key]}


def environment(container: dict[str, Any]) -> dict[str, Any]:
    return {item["Name"]: item["Value"] for item in container["Environment"]}


def task_definition() -> dict[str, Any]:
    [web] = json.loads((ROOT / "deploy" / "ecs" / "task-definition.json").read_text())["containerDefinitions"]
    assert isinstance(web, dict)
    return web


# ---- the scanners ---------------------------------------------------------------------------------------------------


def test_cfn_lint_finds_nothing() -> None:
    result = subprocess.run([scanner("cfn-lint"), str(TEMPLATE)], capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def checkov(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [scanner("checkov"), *args, "--output", "json", "--compact", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    report = json.loads(result.stdout) if result.stdout.strip() else {}
    reports = report if isinstance(report, list) else [report]
    failed = [check for one in reports for check in one.get("results", {}).get("failed_checks", [])]
    assert failed == [], [(c["check_id"], c["file_path"], c["resource"]) for c in failed]
    assert result.returncode == 0, result.stderr[-2000:]
    return {"reports": reports}


def skips(reports: dict[str, Any]) -> list[dict[str, Any]]:
    return [check for one in reports["reports"] for check in one.get("results", {}).get("skipped_checks", [])]


def test_checkov_passes_the_template_and_every_skip_says_why() -> None:
    found = checkov("--file", str(TEMPLATE.relative_to(ROOT)), "--framework", "cloudformation")
    skipped = skips(found)
    assert skipped, "the template's suppressions were not seen"
    for check in skipped:
        assert len(check["check_result"].get("suppress_comment", "")) > 20, check["check_id"]
    passed = [c for one in found["reports"] for c in one["results"]["passed_checks"]]
    assert len(passed) >= 30  # the scan saw the resources, not an empty file


def test_checkov_passes_the_dockerfiles_and_every_skip_says_why() -> None:
    dockerfiles = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "services").glob("*/Dockerfile"))
    found = checkov(*[arg for path in dockerfiles for arg in ("--file", path)], "--framework", "dockerfile")
    for check in skips(found):
        assert check["check_id"] == "CKV_DOCKER_7", check  # ${BASE_IMAGE}: a pinned tag checkov cannot resolve
        assert "pinned" in check["check_result"]["suppress_comment"]


def test_checkov_finds_no_secret_in_the_compose_files_or_the_example_settings() -> None:
    # checkov has no Compose framework: its secrets scan covers these files, and the stack's own tests check what
    # Compose runs (only nginx published, non-root containers: tests/system/test_stack.py).
    files = ["docker-compose.yml", "docker-compose.cluster.yml", "docker-compose.ha.yml", ".env.example"]
    checkov(*[arg for path in files for arg in ("--file", path)], "--framework", "secrets")


# ---- the web container: the task definition's, and the replica's -----------------------------------------------------


def test_the_container_is_the_task_definitions(container: dict[str, Any]) -> None:
    ecs = task_definition()
    ecs_env = {item["name"]: item["value"] for item in ecs["environment"]}
    env = environment(container)
    # REDIS_URL is a secret here (its endpoint comes from the stack); REDIS_CLUSTER follows the shard count.
    assert set(env) == set(ecs_env) - {"REDIS_URL"}
    assert {k: v for k, v in env.items() if k != "REDIS_CLUSTER"} == {
        k: v for k, v in ecs_env.items() if k not in ("REDIS_URL", "REDIS_CLUSTER")
    }
    assert env["REDIS_CLUSTER"] == {"Fn::If": ["ClusterMode", "true", "false"]}
    assert container["User"] == ecs["user"]
    assert container["ReadonlyRootFilesystem"] is ecs["readonlyRootFilesystem"] is True
    assert container["StopTimeout"] == ecs["stopTimeout"]
    assert container["HealthCheck"] == {key[0].upper() + key[1:]: value for key, value in ecs["healthCheck"].items()}
    assert container["LinuxParameters"] == {"Capabilities": {"Drop": ["ALL"]}}
    assert [p["ContainerPort"] for p in container["PortMappings"]] == [p["containerPort"] for p in ecs["portMappings"]]


def test_the_url_and_the_token_are_secrets_never_plain_values(
    template: dict[str, Any], container: dict[str, Any]
) -> None:
    secrets = {item["Name"]: item["ValueFrom"] for item in container["Secrets"]}
    assert secrets == {"REDIS_URL": {"Ref": "RedisUrl"}, "REDIS_PASSWORD": {"Ref": "RedisAuthToken"}}
    assert not {"REDIS_URL", "REDIS_PASSWORD", "REDIS_PASSWORD_FILE"} & set(environment(container))
    redis = properties(template, "Redis")
    assert redis["AuthToken"] == {"Fn::Sub": "{{resolve:secretsmanager:${RedisAuthToken}:SecretString}}"}
    assert redis["TransitEncryptionEnabled"] is redis["AutomaticFailoverEnabled"] is redis["MultiAZEnabled"] is True
    url = properties(template, "RedisUrl")["SecretString"]["Fn::If"]
    assert url[0] == "ClusterMode"
    assert all(branch["Fn::Sub"].startswith("rediss://") for branch in url[1:])  # TLS, certificate checked


def test_every_setting_the_replica_reads_is_set_or_left_to_a_safe_default(container: dict[str, Any]) -> None:
    given = set(environment(container)) | {item["Name"] for item in container["Secrets"]}
    assert given <= settings_read(), "set but not read by the replica"
    assert settings_read() - given == set(LEFT_TO_DEFAULTS)
    env = {k: v for k, v in environment(container).items() if isinstance(v, str)}
    Settings.from_env({**env, "REDIS_URL": "rediss://example.cache.amazonaws.com:6379/0"})  # every value accepted


def test_the_load_balancer_fits_the_replicas_timings(template: dict[str, Any], container: dict[str, Any]) -> None:
    env = {k: v for k, v in environment(container).items() if isinstance(v, str)}
    settings = Settings.from_env(env)
    targets = properties(template, "Targets")
    port = int(dockerfile_values("EXPOSE")[0])
    assert targets["Port"] == port == int(env["PORT"])
    assert targets["HealthCheckPath"] == "/health"
    assert "/health" in " ".join(container["HealthCheck"]["Command"])
    assert targets["HealthCheckIntervalSeconds"] <= container["HealthCheck"]["Interval"]
    balancer = attributes(template, "LoadBalancer", "LoadBalancerAttributes")
    # An idle socket hears a ping every PING_INTERVAL: the ALB must not cut it first (nor nginx's 75 s in Compose).
    assert int(balancer["idle_timeout.timeout_seconds"]) >= 3 * settings.ping_interval
    group = attributes(template, "Targets", "TargetGroupAttributes")
    assert group["stickiness.enabled"] == "false"
    # Within the deregistration delay, the drain watcher notices (it asks every 5 s), the task gets SIGTERM and the
    # replica drains (DRAIN_SECONDS, then every socket closed with 1012, up to 5 s): the ALB cuts no open socket.
    delay = int(group["deregistration_delay.timeout_seconds"])
    [watcher] = [c for c in properties(template, "Task")["ContainerDefinitions"] if c["Name"] == "drain-watch"]
    poll = float(re.findall(r"sleep (\d+)", watcher["Command"][0])[-1])
    assert poll + 2 + settings.drain_seconds + 5 + 5 <= delay
    assert container["StopTimeout"] >= settings.drain_seconds + 5 + float(hypercorn_config(settings).graceful_timeout)


def test_deployments_keep_every_socket_until_it_is_told_to_reconnect(template: dict[str, Any]) -> None:
    deployment = properties(template, "Service")["DeploymentConfiguration"]
    assert deployment == {
        "MinimumHealthyPercent": 100,
        "MaximumPercent": 200,
        "DeploymentCircuitBreaker": {"Enable": True, "Rollback": True},
    }
    policies = {
        properties(template, name)["PolicyName"]
        for name in template["Resources"]
        if template["Resources"][name]["Type"] == "AWS::ApplicationAutoScaling::ScalingPolicy"
    }
    assert policies == {"cpu", "connections-per-task"}


def test_only_the_load_balancer_reaches_the_tasks_and_only_the_tasks_reach_redis(template: dict[str, Any]) -> None:
    tasks = properties(template, "TaskGroup")["SecurityGroupIngress"]
    assert tasks == [
        {
            "IpProtocol": "tcp",
            "FromPort": 8000,
            "ToPort": 8000,
            "SourceSecurityGroupId": {"Ref": "LoadBalancerGroup"},
            "Description": "the load balancer",
        }
    ]
    [redis] = properties(template, "RedisGroup")["SecurityGroupIngress"]
    assert (redis["FromPort"], redis["SourceSecurityGroupId"]) == (6379, {"Ref": "TaskGroup"})


def test_alarms_cover_5xx_unhealthy_targets_redis_cpu_memory_and_failovers(template: dict[str, Any]) -> None:
    alarms = {
        properties(template, name)["MetricName"]
        for name, resource in template["Resources"].items()
        if resource["Type"] == "AWS::CloudWatch::Alarm"
    }
    assert {
        "HTTPCode_ELB_5XX_Count",
        "HTTPCode_Target_5XX_Count",
        "UnHealthyHostCount",
        "EngineCPUUtilization",
        "DatabaseMemoryUsagePercentage",
    } <= alarms
    # Failover events themselves come from ElastiCache, to the alarms' topic.
    assert properties(template, "Redis")["NotificationTopicArn"] == {"Ref": "Alarms"}
    assert properties(template, "Logs")["RetentionInDays"] == {"Ref": "LogRetentionDays"}


# ---- scripts/deploy-aws --dry-run -----------------------------------------------------------------------------------


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A git checkout of its own with both scripts, the template and the build contexts' Dockerfiles (as
    test_ops_deploy's, plus deploy-aws)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "deploy" / "aws").mkdir(parents=True)
    for script in ("push-images", "deploy-aws"):
        shutil.copy2(ROOT / "scripts" / script, repo / "scripts" / script)
    shutil.copy2(TEMPLATE, repo / "deploy" / "aws" / TEMPLATE.name)
    for image in ("web", "nginx", "redis", "prometheus"):
        (repo / "services" / image).mkdir(parents=True)
        shutil.copy2(ROOT / "services" / image / "Dockerfile", repo / "services" / image / "Dockerfile")
    shutil.copy2(ROOT / "services" / "web" / "pyproject.toml", repo / "services" / "web" / "pyproject.toml")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "test"], check=True)
    return repo


def deploy_aws(repo: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_trapped(repo / "scripts" / "deploy-aws", tmp_path, *args)


def test_deploy_aws_dry_run_prints_the_push_and_the_stack_commands_and_runs_none(
    checkout: Path, tmp_path: Path
) -> None:
    certificate = "arn:aws:acm:eu-west-1:123456789012:certificate/0f0f"
    result = deploy_aws(
        checkout,
        tmp_path,
        "--dry-run",
        "--region",
        "eu-west-1",
        "--registry",
        REGISTRY,
        "--stack",
        "chat-prod",
        "--param",
        f"CertificateArn={certificate}",
        "--param",
        "RedisShards=3",
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "called").exists(), (tmp_path / "called").read_text()
    tag = commit_of(checkout)[:12]
    lines = result.stdout.splitlines()
    # First what scripts/push-images prints (its own test checks those lines), then the stack.
    assert lines[0].startswith("aws ecr get-login-password --region eu-west-1 | docker login")
    assert f"docker push {REGISTRY}/infinite-chat/web:{tag}" in lines
    assert lines[-2:] == [
        "aws cloudformation deploy --region eu-west-1 --stack-name chat-prod "
        "--template-file deploy/aws/infinite-chat.yaml --capabilities CAPABILITY_IAM --no-fail-on-empty-changeset "
        f"--parameter-overrides WebImage={REGISTRY}/infinite-chat/web:{tag} CertificateArn={certificate} "
        "RedisShards=3",
        "aws cloudformation describe-stacks --region eu-west-1 --stack-name chat-prod "
        "--query 'Stacks[0].Outputs[?OutputKey=='\\''Url'\\''].OutputValue' --output text",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dry-run", "--registry", REGISTRY], "no region"),
        (["--dry-run", "--region", "eu-west-1"], "pass --registry"),
        (["--dry-run", "--region", "eu-west-1", "--registry", REGISTRY, "--param", "WebImage=x:y"], "WebImage"),
        (["--dry-run", "--region", "eu-west-1", "--registry", REGISTRY, "--param", "novalue"], "Key=Value"),
        (["--dry-run", "--region", "eu-west-1", "--registry", REGISTRY, "--stack", "1bad"], "stack name"),
    ],
)
def test_deploy_aws_refuses_what_it_cannot_deploy(
    checkout: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    result = deploy_aws(checkout, tmp_path, *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "called").exists()


def test_the_docs_deploy_with_the_script_and_the_template() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    section = operations.split("## Deploying to AWS\n", 1)[1].split("\n## ", 1)[0]
    for needed in ("scripts/deploy-aws", "scripts/push-images", "aws cloudformation delete-stack", "Url"):
        assert needed in section, needed
    assert re.search(r"\$\d+", section), "the costs to expect"


def test_metrics_are_not_served_through_the_load_balancer(template: dict[str, Any]) -> None:
    rules = [
        properties(template, name)
        for name, resource in template["Resources"].items()
        if resource["Type"] == "AWS::ElasticLoadBalancingV2::ListenerRule"
    ]
    listeners = {rule["ListenerArn"]["Ref"] for rule in rules}
    assert listeners == {"HttpListener", "HttpsListener"}  # whichever one forwards to the tasks
    for rule in rules:
        assert rule["Conditions"][0]["PathPatternConfig"]["Values"] == ["/metrics", "/metrics/*"]
        assert rule["Actions"][0]["FixedResponseConfig"]["StatusCode"] == "404"


def test_the_drain_watcher_stops_its_task_only_when_its_target_drains(template: dict[str, Any], tmp_path: Path) -> None:
    """The watcher's script, run here: a metadata endpoint of the test's own, and an `aws` that answers `healthy`
    (or fails) until a file says `draining`. It must keep going through errors and exit once draining."""
    [watcher, web] = properties(template, "Task")["ContainerDefinitions"]
    assert (watcher["Name"], watcher["Essential"], web["Name"]) == ("drain-watch", True, "web")
    script = watcher["Command"][0].replace("sleep 5", "sleep 0.1")
    state = tmp_path / "state"
    state.write_text("error")
    asked = tmp_path / "asked"
    fake = tmp_path / "bin" / "aws"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$*" >> {asked}\ns=$(cat {state})\n[ "$s" = error ] && exit 255\necho "$s"\n')
    fake.chmod(0o755)

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"Containers": [{"Networks": [{"IPv4Addresses": ["10.42.3.7"]}]}]}).encode()
            self.send_response(200 if self.path == "/v4/abc/task" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        "PATH": f"{fake.parent}:/usr/bin:/bin",
        "ECS_CONTAINER_METADATA_URI_V4": f"http://127.0.0.1:{server.server_port}/v4/abc",
        "TARGET_GROUP_ARN": "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/t/0f",
    }
    watching = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (asked.exists() and len(asked.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline, "the watcher asked nothing"
            assert watching.poll() is None, "the watcher stopped on an error"
            time.sleep(0.05)
        state.write_text("healthy")
        seen = len(asked.read_text().splitlines())
        while len(asked.read_text().splitlines()) < seen + 3:
            assert time.monotonic() < deadline
            assert watching.poll() is None, "the watcher stopped a healthy task"
            time.sleep(0.05)
        state.write_text("draining")
        assert watching.wait(timeout=10) == 0
        assert "draining" in (watching.stdout.read() if watching.stdout else "")
    finally:
        if watching.poll() is None:
            watching.kill()
        server.shutdown()
    first = asked.read_text().splitlines()[0]
    assert "elbv2 describe-target-health" in first
    assert "Id=10.42.3.7,Port=8000" in first


def test_the_template_fits_a_deploy_without_a_bucket() -> None:
    # `aws cloudformation deploy` sends a template of at most 51,200 bytes itself; a larger one needs --s3-bucket.
    assert TEMPLATE.stat().st_size < 51_200
