"""Operations on the running stack: Prometheus (the `monitoring` profile) scraping every replica, the JSON logs of
the replicas and of nginx, the images' labels, and a replica talking to Redis over TLS with a password (ElastiCache's
setup) against a Redis with TLS enabled."""

from __future__ import annotations

import datetime
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from support.chat import ChatClient, client_on, eventually_async, poll
from support.stack import Stack, free_port

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def image(stack: Stack, name: str) -> str:
    return f"{os.environ.get('IMAGE_PREFIX', 'infinite-chat')}/{name}:{stack.env['IMAGE_TAG']}"


def container_ip(stack: Stack, container: str) -> str:
    out = stack.docker("inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", container)
    [address] = out.stdout.split()
    return address


def stdout_lines(stack: Stack, container: str) -> list[str]:
    """What the container wrote on stdout (docker logs keeps stderr apart)."""
    return [line for line in stack.docker("logs", container).stdout.splitlines() if line.strip()]


# --- Prometheus ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Monitoring:
    container: str
    revision: str  # the GIT_REVISION its image was built with


@pytest.fixture(scope="module")
def prometheus(stack: Stack) -> Iterator[Monitoring]:
    """The `monitoring` profile started on the test stack (built with this commit as its revision); removed after."""
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    profile = ("--profile", "monitoring")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PROMETHEUS_PORT", str(free_port()))
        env.setenv("GIT_REVISION", revision)
        try:
            stack.compose(*profile, "up", "--detach", "--build", "--wait", "prometheus", timeout=900)
            [container] = [line for line in stack.compose(*profile, "ps", "--quiet", "prometheus").stdout.split()]
            yield Monitoring(container, revision)
        except subprocess.CalledProcessError as error:
            raise AssertionError(f"the monitoring profile did not start: {error.stderr}") from None
        finally:
            stack.compose(*profile, "rm", "--stop", "--force", "prometheus", check=False)
            stack.docker("volume", "rm", "--force", f"{stack.project}_prometheus-data", check=False)


def promql(stack: Stack, container: str, query: str) -> dict[str, float]:
    """An instant query through the Prometheus API inside its container (promtool is part of Debian's package):
    instance -> value."""
    out = stack.exec(container, "promtool", "query", "instant", "-o", "json", "http://localhost:9090", query).stdout
    return {series["metric"].get("instance", ""): float(series["value"][1]) for series in json.loads(out)}


def test_monitoring_profile_scrapes_every_replica(stack: Stack, prometheus: Monitoring, replicas: list[str]) -> None:
    expected = {f"{container_ip(stack, container)}:8000" for container in stack.web_containers()}
    assert len(expected) == len(replicas) == 2

    def all_up() -> dict[str, float] | None:
        up = promql(stack, prometheus.container, 'up{job="web"}')
        return up if up == dict.fromkeys(expected, 1.0) else None

    # Discovery is immediate and the first scrape comes within one 15 s interval.
    poll(all_up, timeout=90, what=f"Prometheus to scrape {sorted(expected)} with up == 1")
    # What it scrapes is the chat's own metrics, from each replica.
    assert set(promql(stack, prometheus.container, "chat_connections")) == expected
    assert set(promql(stack, prometheus.container, 'chat_redis_errors_total{kind="command"}')) == expected
    # Its UI and API have no login: published on the loopback address only.
    inspected = stack.docker("inspect", "--format", "{{json .NetworkSettings.Ports}}", prometheus.container)
    ports = json.loads(inspected.stdout)
    bindings = ports["9090/tcp"]
    assert bindings
    assert all(binding["HostIp"] == "127.0.0.1" for binding in bindings)
    assert stack.exec(prometheus.container, "id", "-u").stdout.strip() != "0"


def test_images_are_labelled_with_source_revision_and_version(stack: Stack, prometheus: Monitoring) -> None:
    for name in ("web", "nginx", "redis", "prometheus"):
        out = stack.docker("image", "inspect", "--format", "{{json .Config.Labels}}", image(stack, name)).stdout
        labels = json.loads(out)
        assert labels["org.opencontainers.image.source"].startswith("https://"), name
        assert labels["org.opencontainers.image.version"], name
        assert labels["org.opencontainers.image.revision"], name
    # Compose hands GIT_REVISION (scripts/up exports it) to the build: the image just built carries it.
    prometheus_labels = json.loads(
        stack.docker("image", "inspect", "--format", "{{json .Config.Labels}}", image(stack, "prometheus")).stdout
    )
    assert prometheus_labels["org.opencontainers.image.revision"] == prometheus.revision


# --- logs ---------------------------------------------------------------------------------------------------------


async def test_replica_logs_are_json_lines_without_message_text(stack: Stack, room: str) -> None:
    text = f"private words {secrets.token_hex(8)}"
    client = await client_on(stack.ws_url, None, name="logged", room=room)
    echo = await client.say_and_wait(text, ref="log-1")
    assert echo["type"] == "message"
    await client.close()
    container = next(c for c in stack.web_containers() if stack.replica_name(c) == client.replica)
    lines = stdout_lines(stack, container)
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    for entry in entries:
        assert {"ts", "level", "replica", "event"} <= set(entry), entry
        assert entry["replica"] == client.replica
    joins = [e for e in entries if e["event"] == "join" and e.get("room") == room]
    assert len(joins) == 1
    assert joins[0]["connection"]
    everything = stack.docker("logs", container)
    assert text not in everything.stdout + everything.stderr
    assert stack.env["REDIS_PASSWORD"] not in everything.stdout + everything.stderr


def test_nginx_access_log_is_json_with_the_upstream_and_its_time(stack: Stack, replicas: list[str]) -> None:
    agent = f"ops-test-{secrets.token_hex(6)}"
    response = stack.get("/health", headers={"User-Agent": agent})
    assert response.status_code == 200
    [nginx] = stack.containers("nginx")
    addresses = {f"{container_ip(stack, c)}:8000" for c in stack.web_containers()}

    def logged() -> dict[str, Any] | None:
        mine = [e for e in map(json.loads, stdout_lines(stack, nginx)) if e.get("user_agent") == agent]
        return mine[0] if mine else None

    entry = poll(logged, timeout=15, what="nginx to log the request", interval=0.2)
    assert entry["uri"] == "/health"
    assert entry["status"] == 200
    assert entry["upstream"] in addresses
    assert entry["upstream_status"] == "200"
    # Seconds, as nginx measures them: the upstream's part of the request, within the whole. nginx takes the two
    # at millisecond resolution from its cached clock at different moments, so the part can show a millisecond or
    # two more than the whole (seen once: 0.002 against 0.001).
    upstream, whole = float(entry["upstream_response_time"]), float(entry["request_time"])
    assert 0 <= upstream <= whole + 0.002
    assert whole < 15


def test_metrics_are_not_served_through_nginx(stack: Stack) -> None:
    assert stack.get("/metrics").status_code == 404
    # ...but each replica serves them inside the Compose network, where Prometheus scrapes.
    for container in stack.web_containers():
        assert "chat_connections" in stack.replica_metrics(container)


# --- Redis over TLS -----------------------------------------------------------------------------------------------


def write_certificates(directory: Path, host: str) -> None:
    """A CA of the test's own and a certificate for `host` signed by it (as ElastiCache's is by Amazon's CA)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Infinite Chat test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir()
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    # Read inside the containers by their unprivileged users; a throwaway key for a throwaway server.
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


@pytest.fixture
def tls_redis(stack: Stack, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A Redis that speaks only TLS (no plain port) and wants a password, on a Docker network of the test's own,
    from the stack's Redis image (Debian's redis-server is built with TLS)."""
    certificates = tmp_path / "tls"
    write_certificates(certificates, "redis-tls")
    network = f"{stack.project}-tls-{secrets.token_hex(3)}"
    password = secrets.token_hex(16)
    started: list[str] = []
    stack.docker("network", "create", network)
    try:
        redis = f"{network}-redis"
        stack.docker(
            "run", "--detach", "--name", redis, "--network", network, "--network-alias", "redis-tls",
            "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
            "--volume", f"{certificates}:/tls:ro", "--entrypoint", "redis-server", image(stack, "redis"),
            "--port", "0", "--tls-port", "6380",
            "--tls-cert-file", "/tls/server.crt", "--tls-key-file", "/tls/server.key",
            "--tls-ca-cert-file", "/tls/ca.crt", "--tls-auth-clients", "no",
            "--requirepass", password, "--save", "", "--appendonly", "no",
        )  # fmt: skip
        started.append(redis)
        yield {"network": network, "password": password, "certificates": str(certificates), "prefix": network}
    finally:
        for container in started:
            stack.docker("rm", "--force", "--volumes", container, check=False)
        # Replicas the test started on this network are named after it (and removed by the test).
        stack.docker("network", "rm", network, check=False)


def run_replica(stack: Stack, tls: dict[str, str], name: str, *env: str) -> str:
    """A web replica on the TLS network with its port published on 127.0.0.1; returns its base URL."""
    stack.docker(
        "run", "--detach", "--name", name, "--network", tls["network"], "--read-only", "--tmpfs", "/tmp",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true", "--publish", "127.0.0.1::8000",
        "--volume", f"{tls['certificates']}:/tls:ro",
        "--env", "REDIS_URL=rediss://redis-tls:6380/0", "--env", f"REDIS_PASSWORD={tls['password']}",
        # A Redis without replicas: nothing to wait for (its durability is appendfsync always).
        "--env", "REDIS_CONFIRM_REPLICAS=0",
        *[arg for pair in env for arg in ("--env", pair)], image(stack, "web"),
    )  # fmt: skip
    address = stack.docker("port", name, "8000/tcp").stdout.split()[0]
    return f"http://{address}"


async def ready_status(url: str) -> int | None:
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            return (await http.get(f"{url}/ready")).status_code
    except httpx.TransportError:
        return None


async def test_replica_chats_through_redis_over_tls_with_a_password(stack: Stack, tls_redis: dict[str, str]) -> None:
    trusting = f"{tls_redis['prefix']}-web"
    doubting = f"{tls_redis['prefix']}-web-no-ca"
    try:
        url = run_replica(stack, tls_redis, trusting, "REDIS_CA_FILE=/tls/ca.crt")
        # A replica that is not given the CA must refuse the server: the certificate really is verified.
        other = run_replica(stack, tls_redis, doubting)

        async def ready() -> bool:
            return await ready_status(url) == 200

        await eventually_async(ready, timeout=90, what="the replica to reach Redis over TLS (/ready 200)")
        client = await ChatClient.open(url.replace("http://", "ws://") + "/ws")
        welcome = await client.join("secure", f"tls-{secrets.token_hex(4)}")
        assert welcome["type"] == "welcome"
        # The echo is the message stored by append.lua and heard back through pub/sub: both ran over TLS.
        echo = await client.say_and_wait("over TLS", ref="tls-1")
        assert echo["type"] == "message"
        assert echo["text"] == "over TLS"
        await client.close()

        async def answered() -> bool:
            return await ready_status(other) is not None

        await eventually_async(answered, timeout=90, what="the replica without the CA to answer /ready")
        async with httpx.AsyncClient(timeout=10) as http:
            refused = await http.get(f"{other}/ready")
        assert refused.status_code == 503
        assert refused.json()["status"] == "unavailable"
    finally:
        for container in (trusting, doubting):
            stack.docker("rm", "--force", container, check=False)
