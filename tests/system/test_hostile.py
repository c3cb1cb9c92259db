"""Hostile and malformed input, and the stack's own defences: each bad input gets a clear error or a clean close and
the replica keeps serving others; secrets stay secret; internals stay internal; containers are locked down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time

import httpx
import pytest
import websockets

from support.addresses import forwarded
from support.chat import ChatClient, answer_to, eventually, still_chats
from support.names import unique
from support.rawws import OP_CLOSE, OP_TEXT, RawSocket, frame_header, mask
from support.resilient import read_log
from support.stack import Stack

MAX_FRAME = 16 * 1024


# ---- frames --------------------------------------------------------------------------------------------------------


async def test_frame_over_16_kib_is_closed_with_1009_and_one_at_the_limit_is_read(stack: Stack, room: str) -> None:
    at_limit = json.dumps({"type": "join", "name": unique("edge"), "room": room}).ljust(MAX_FRAME)
    client = await ChatClient.open(stack.ws_url)
    await client.send_raw(at_limit)
    welcome = await client.wait_for(lambda o: o["type"] == "welcome")
    assert welcome["name"].startswith("edge-")

    await client.send_raw(json.dumps({"type": "say", "text": "x"}).ljust(MAX_FRAME + 1))
    assert await client.wait_closed() == 1009

    # Counted in bytes, not characters: 6,000 three-byte characters are 18,000 bytes.
    wide = await ChatClient.open(stack.ws_url)
    await wide.send_raw(json.dumps({"type": "say", "text": "€" * 6000}, ensure_ascii=False))
    assert await wide.wait_closed() == 1009
    await still_chats(stack.ws_url, [welcome["replica"]], room)


async def test_a_five_megabyte_frame_is_refused_before_it_is_read(stack: Stack, room: str) -> None:
    """The close comes after the first 16 KiB, while almost all of the frame is still unsent, and sending the rest
    anyway does not make the replica hold it."""
    raw = await RawSocket.open("127.0.0.1", stack.http_port)
    await raw.send_json({"type": "join", "name": unique("flooder"), "room": room})
    replica = (await raw.read_objects())[0]["replica"]
    container = stack.container_of(replica)
    before = stack.rss_kib(container)

    size = 5 * 1024 * 1024
    key = b"\x01\x02\x03\x04"
    chunk = mask(b"x" * 65536, key)  # 65536 is a multiple of 4: each chunk continues the mask where the last ended
    raw.writer.write(frame_header(OP_TEXT, size) + key + chunk[: MAX_FRAME * 2])
    await raw.writer.drain()
    objects = await raw.read_until_closed(30)
    assert raw.close_code == 1009
    assert all(obj["type"] != "error" for obj in objects)

    sent = MAX_FRAME * 2
    try:
        while sent < size:
            raw.writer.write(chunk[: min(len(chunk), size - sent)])
            await raw.writer.drain()
            sent += len(chunk)
        # Our close, after the whole frame: once the replica hangs up, it has read everything before it.
        await raw.send_frame(OP_CLOSE, struct.pack("!H", 1000))
        await asyncio.wait_for(raw.reader.read(), 10)  # and hangs up at once, not after a timeout
    except ConnectionError:
        pass  # the replica or nginx may hang up on a peer that ignores the close: fine too
    after = stack.rss_kib(container)
    raw.abort()
    assert after - before < 4 * 1024, f"replica memory grew by {after - before} KiB for a refused 5 MiB frame"
    await still_chats(stack.ws_url, [replica], room)


async def test_frames_that_cannot_be_parsed_are_closed_with_a_close_frame(stack: Stack, room: str) -> None:
    """Invalid UTF-8 in a text frame: 1007 (a close frame, not a dropped connection), and nothing of it stored."""
    ws = await websockets.connect(stack.ws_url, compression=None, additional_headers=forwarded())
    await ws.send(json.dumps({"type": "join", "name": unique("garbled"), "room": room}))
    welcome = str(await asyncio.wait_for(ws.recv(), 10)).split("\n")[0]  # a frame may carry several objects
    replica = json.loads(welcome)["replica"]
    await ws.send(b'{"type": "say", "text": "\xff\xfe"}', text=True)
    await asyncio.wait_for(read_until_closed(ws), 10)  # presence, then the close
    assert ws.close_code == 1007
    assert ws.protocol.close_rcvd is not None  # the replica sent a close frame
    assert stack.get(f"/api/rooms/{room}/messages").json()["messages"] == []
    await still_chats(stack.ws_url, [replica], room)


async def read_until_closed(ws: websockets.ClientConnection) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        async for _ in ws:
            pass


# ---- limits ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "join", "name": "n" * 33}, "invalid_name"),
        ({"type": "join", "name": "   "}, "invalid_name"),
        ({"type": "join", "name": "bell\x07"}, "invalid_name"),
        ({"type": "join", "name": "ok", "room": "Upper"}, "invalid_room"),
        ({"type": "join", "name": "ok", "room": "r" * 33}, "invalid_room"),
        ({"type": "say", "text": "t" * 2001}, "too_long"),
        ({"type": "say", "text": "bell\x07"}, "invalid_text"),
        ({"type": "say", "text": "hi", "ref": "r" * 65}, "invalid_ref"),
    ],
)
async def test_over_the_limit_gets_its_code_and_the_socket_stays_usable(
    stack: Stack, room: str, frame: dict[str, object], code: str
) -> None:
    client = await ChatClient.open(stack.ws_url)
    if frame["type"] == "say":
        await client.join("limits", room)
    await client.send(frame)
    error = await client.wait_for(lambda o: o["type"] == "error")
    assert error["code"] == code
    if frame["type"] == "join":
        await client.join("limits", room)
    # At the limit is fine, and the socket carries on.
    echo = await client.say_and_wait("t" * 2000, ref="r" * 64)
    assert echo["type"] == "message"
    await client.close()


async def test_rate_limit_refuses_past_the_burst_and_stores_nothing_refused(stack: Stack, room: str) -> None:
    sender = await ChatClient.open(stack.ws_url)
    await sender.join("hasty", room)
    reader = await ChatClient.open(stack.ws_url)
    await reader.join("reader", room)
    refs = [f"burst-{i}" for i in range(20)]
    for ref in refs:  # as fast as the socket takes them: far over 5 a second
        await sender.say(f"message {ref}", ref)
    for ref in refs:
        await sender.wait_for(answer_to(ref))
    replies = {o["ref"]: o for o in sender.objects if o.get("ref") in refs and o["type"] in ("message", "error")}
    accepted = [ref for ref in refs if replies[ref]["type"] == "message"]
    limited = [replies[ref] for ref in refs if replies[ref]["type"] == "error"]
    assert 10 <= len(accepted) < len(refs)
    assert accepted == refs[: len(accepted)]  # the burst, then refusals (a token may come back meanwhile)
    for error in limited:
        assert error["code"] == "rate_limited"
        assert 0 < error["retry_after_ms"] <= 1000
    # Nothing refused was stored or delivered.
    stored = [m["ref"] for m in await asyncio.to_thread(read_log, stack.base_url, room)]
    assert stored == accepted
    await reader.wait_for(lambda o: o.get("ref") == accepted[-1])
    assert [m["ref"] for m in reader.of_type("message")] == accepted
    # After waiting as told, the next message goes through.
    await asyncio.sleep(max(error["retry_after_ms"] for error in limited) / 1000)  # the server's own instruction
    assert (await sender.say_and_wait("patient now", ref="after"))["type"] == "message"
    await sender.close()
    await reader.close()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("\u200b", "a zero-width space alone"),
        ("\u3164", "a Hangul filler, which draws nothing"),
        ("\u2800", "the Braille blank"),
        ("alice\u200b", "alice with a zero-width space: a second alice in the online list"),
        ("\u202enimda", "a right-to-left override: shows as admin"),
        ("\u0301abc", "a name starting with a combining accent"),
        ("bob\ue000", "a private-use character"),
        ("bob\U000e0041", "a tag character"),
    ],
)
async def test_an_invisible_or_reversed_name_is_refused(stack: Stack, room: str, name: str, reason: str) -> None:
    client = await ChatClient.open(stack.ws_url)
    await client.send({"type": "join", "name": name, "room": room})
    error = await client.wait_for(lambda o: o["type"] == "error")
    assert error["code"] == "invalid_name", reason
    await client.join("visible", room)  # the socket carries on
    await client.close()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("\u200b\u200b\u200b", "zero-width spaces only"),
        ("\u3164\u3164", "Hangul fillers only"),
        ("\u2800", "the Braille blank"),
        ("\u200b \u2800 \u3164", "blanks of every kind, with spaces"),
        ("\u0301", "a combining accent alone"),
        ("see \u202egnp.exe", "a right-to-left override: shows as exe.png"),
        ("isolated \u2066text\u2069", "a directional isolate"),
    ],
)
async def test_an_invisible_or_reversing_text_is_refused(stack: Stack, room: str, text: str, reason: str) -> None:
    client = await ChatClient.open(stack.ws_url)
    await client.join("texter", room)
    answer = await client.say_and_wait(text, ref="t")
    assert (answer["type"], answer.get("code")) == ("error", "invalid_text"), reason
    assert await asyncio.to_thread(read_log, stack.base_url, room) == []
    await client.close()


async def test_names_and_texts_people_write_are_accepted(stack: Stack, room: str) -> None:
    """The refusals above spare real writing: accents, right-to-left scripts, emoji sequences, a zero-width space
    between visible words, and emoji newer than the server's Unicode tables."""
    names = ["Zoë", "مريم", "李小龙", "👨\u200d👩\u200d👧", "❤\ufe0f fan", "O'Brien-Smith"]
    texts = ["مرحبا بالعالم", "a\u200bb", "shaking face \U0001fae8", "line one\nline two", "א\u200fb"]
    for n, name in enumerate(names):
        client = await ChatClient.open(stack.ws_url)
        welcome = await client.join(name, room)
        assert welcome["name"] == name
        answer = await client.say_and_wait(texts[n % len(texts)], ref=f"r{n}")
        assert answer["type"] == "message", answer
        await client.close()


# ---- cross-site WebSocket hijacking --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "null",
        "http://127.0.0.1:{port}.evil.example",
        "http://evil.example/http://127.0.0.1:{port}",
        "ftp://127.0.0.1:{port}",
    ],
)
async def test_socket_from_another_origin_is_refused_with_403(stack: Stack, origin: str) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(
            stack.ws_url,
            additional_headers=forwarded() | {"Origin": origin.format(port=stack.http_port)},
            open_timeout=15,
        )
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body or b"{}")["error"] == "forbidden_origin"


async def test_socket_from_own_origin_or_without_origin_is_allowed(stack: Stack, room: str) -> None:
    own = await ChatClient.open(stack.ws_url, origin=stack.origin)
    await own.join("browser", room)
    tool = await ChatClient.open(stack.ws_url)  # no Origin: not a browser
    await tool.join("tool", room)
    echo = await own.say_and_wait("from the page", ref="p")
    assert echo["type"] == "message"
    await tool.wait_for(lambda o: o.get("ref") == "p")
    await own.close()
    await tool.close()


# ---- HTTP ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "code"),
    [
        ("/api/rooms/{room}/messages", {"limit": "0"}, "invalid_limit"),
        ("/api/rooms/{room}/messages", {"limit": "101"}, "invalid_limit"),
        ("/api/rooms/{room}/messages", {"limit": "-1"}, "invalid_limit"),
        ("/api/rooms/{room}/messages", {"limit": "abc"}, "invalid_limit"),
        ("/api/rooms/{room}/messages", {"limit": "1e2"}, "invalid_limit"),
        ("/api/rooms/{room}/messages", {"limit": "\u0665"}, "invalid_limit"),  # an Arabic-Indic five
        ("/api/rooms/{room}/messages", {"limit": "9" * 40}, "invalid_limit"),
        # Past Python's 4,300-digit limit for int(): once a 500 with a traceback in the log.
        ("/api/rooms/{room}/messages", {"limit": "9" * 5000}, "invalid_limit"),
        ("/api/rooms/{room}/messages", {"limit": "0" * 5000 + "5"}, "invalid_limit"),
        ("/api/rooms/{room}/messages", {"before": "abc"}, "invalid_before"),
        ("/api/rooms/{room}/messages", {"before": "1-"}, "invalid_before"),
        ("/api/rooms/{room}/messages", {"before": ""}, "invalid_before"),
        ("/api/rooms/{room}/messages", {"before": "9" * 30 + "-0"}, "invalid_before"),
        ("/api/rooms/{room}/messages", {"before": "99999999999999999999-0"}, "invalid_before"),
        ("/api/rooms/UPPER/messages", {}, "invalid_room"),
        ("/api/rooms/" + "r" * 33 + "/messages", {}, "invalid_room"),
        ("/api/rooms/bad%21room/messages", {}, "invalid_room"),
        ("/api/rooms/%C3%A9/messages", {}, "invalid_room"),
        ("/api/rooms/lob%20by/messages", {}, "invalid_room"),
        ("/api/rooms/{room}/messages", {"before": "\u0661-\u0660"}, "invalid_before"),  # Arabic-Indic digits
        ("/api/rooms/{room}/online", {"limit": "9" * 5000}, "invalid_limit"),
        ("/api/rooms/{room}/online", {"limit": "\u0665"}, "invalid_limit"),
        ("/api/rooms/{room}/online", {"after": "a" * 5000}, "invalid_after"),
        ("/api/rooms/{room}/online", {"after": ""}, "invalid_after"),
        ("/api/rooms/{room}/online", {"after": "alice\n"}, "invalid_after"),
        ("/api/rooms/{room}/online", {"after": "\u202enimda"}, "invalid_after"),  # a right-to-left override
        ("/api/rooms/UPPER/online", {}, "invalid_room"),
    ],
)
def test_http_api_bad_parameters_get_400(stack: Stack, room: str, path: str, params: dict[str, str], code: str) -> None:
    response = stack.get(path.format(room=room), params=params)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == code
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "path", ["/api/rooms/lobby//messages", "/api/rooms//lobby/messages", "/static//app.js", "/health/", "/ready/"]
)
def test_no_response_redirects_to_a_host_the_client_sent(stack: Stack, path: str) -> None:
    """Doubled or trailing slashes once got a 308 to http://<the request's Host>/..., which a shared cache could keep
    and serve to others: now they are simply not found, and nothing echoes the Host."""
    request = f"GET {path} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".encode()
    response = raw_http(stack.http_port, request)
    head = response.partition(b"\r\n\r\n")[0].lower()
    assert head.split(b" ", 2)[1] == b"404", head[:200]
    assert b"location:" not in head
    assert b"evil.example" not in response


def raw_http(port: int, request: bytes) -> bytes:
    """One request on a fresh connection (which the request should ask to close), and the whole response."""
    for _ in range(5):
        chunks = []
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            try:
                sock.sendall(request)
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            except ConnectionResetError:
                # nginx refuses an oversized request before reading all of it, then closes with bytes unread, which
                # resets the connection: the answer is usually in already, and else this asks again.
                pass
        if chunks:
            return b"".join(chunks)
    raise AssertionError("no response in 5 tries")


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET `path` byte for byte: an HTTP library would tidy "//metrics" or "/x/../metrics" before sending it."""
    response = raw_http(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    "path",
    [
        "/api/rooms/lobby/messages?before=0-0",
        "/api/rooms/lobby/messages?before=18446744073709551615-18446744073709551615",
        "/api/rooms/lobby/messages?limit=5&limit=x",
        "/api/rooms/%00/messages",
        "/api/rooms/../messages",
        "/api/rooms//messages",
        "/api/rooms/lobby/messages/extra",
        "/ws?x=" + "%ff" * 100,
        "/%ff",
        "/static/..%2f..%2fetc%2fpasswd",
    ],
)
def test_http_odd_requests_never_get_a_server_error(stack: Stack, path: str) -> None:
    status, body = raw_get(stack.http_port, path)
    assert status < 500, f"{path}: {status} {body[:200]!r}"
    assert b"Traceback" not in body


def test_nginx_refuses_oversized_bodies_and_headers_itself(stack: Stack) -> None:
    body = httpx.post(
        f"{stack.base_url}/api/rooms/lobby/messages", content=b"x" * 20_000, timeout=15, headers=forwarded()
    )
    assert body.status_code == 413
    assert body.headers.get("server") == "nginx"  # nginx's own answer, without a version

    big_header = raw_http(stack.http_port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
    assert big_header.split(b" ", 2)[1] in (b"400", b"431", b"494"), big_header[:100]
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 4000) for i in range(12))
    many_headers = raw_http(stack.http_port, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert many_headers.split(b" ", 2)[1] in (b"400", b"431", b"494"), many_headers[:100]
    long_line = raw_http(stack.http_port, b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert long_line.split(b" ", 2)[1] == b"414", long_line[:100]
    # nginx is fine afterwards.
    assert stack.get("/health").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/metrics",
        "/metrics/",
        "//metrics",
        "/./metrics",
        "/x/../metrics",
        "/%6detrics",
        "/metrics?format=prometheus",
        "/Metrics",
        "/admin",
        "/debug",
        "/server-status",
        "/nginx_status",
        "/.env",
        "/.git/config",
    ],
)
def test_internal_paths_are_not_reachable_through_nginx(stack: Stack, path: str) -> None:
    status, body = raw_get(stack.http_port, path)
    assert status == 404, f"{path}: {status} {body[:200]!r}"
    assert b"chat_connections" not in body


# ---- secrets ---------------------------------------------------------------------------------------------------------


def test_redis_refuses_clients_without_the_password(stack: Stack) -> None:
    redis = stack.containers("redis")[0]
    # Inside Redis's own container, without REDISCLI_AUTH.
    anonymous = stack.exec(redis, "redis-cli", "ping", check=False)
    assert "NOAUTH" in anonymous.stdout + anonymous.stderr
    wrong = stack.exec(redis, "sh", "-c", "REDISCLI_AUTH=guess redis-cli ping", check=False)
    assert "WRONGPASS" in wrong.stdout + wrong.stderr
    # From a replica's container, over the Compose network, as a program would.
    script = (
        "import redis\n"
        "try:\n    redis.Redis(host='redis', socket_timeout=5).ping(); print('ANSWERED')\n"
        "except redis.AuthenticationError as error: print('REFUSED', error)\n"
    )
    attempt = stack.exec(stack.web_containers()[0], "python3", "-c", script, check=False)
    assert attempt.stdout.startswith("REFUSED"), attempt.stdout + attempt.stderr


def test_password_is_in_no_log_image_or_error(stack: Stack) -> None:
    password = stack.env["REDIS_PASSWORD"]
    # Errors a client can see, while Redis is up (the outage test checks them while it is down).
    assert password not in stack.get("/ready").text
    assert password not in stack.get("/api/rooms/lobby/messages?limit=zzz").text
    logs = stack.compose("logs", "--no-color", "--timestamps").stdout
    assert '"event":"started"' in logs  # the logs are there to search
    assert password not in logs
    for service in ("web", "redis", "nginx"):
        for container in stack.containers(service):
            image = stack.docker("inspect", "--format", "{{.Image}}", container).stdout.strip()
            history = stack.docker("history", "--no-trunc", image).stdout
            assert "RUN" in history or "COPY" in history
            assert password not in history, f"{service} image history holds the password"
            config = stack.docker("image", "inspect", image).stdout
            assert password not in config, f"{service} image config holds the password"
            # Nor any file in the image (the password is only in the environment at run time).
            found = stack.exec(container, "grep", "-rlsF", "--", password, "/etc", "/opt", "/usr/local", check=False)
            assert not found.stdout.strip(), found.stdout


# ---- containers ------------------------------------------------------------------------------------------------------


def test_containers_are_locked_down(stack: Stack) -> None:
    for service in ("web", "redis", "nginx"):
        for container in stack.containers(service):
            host = json.loads(stack.docker("inspect", "--format", "{{json .HostConfig}}", container).stdout)
            assert host["ReadonlyRootfs"] is True, f"{container} has a writable root filesystem"
            assert "ALL" in (host["CapDrop"] or []), f"{container} keeps capabilities"
            assert "no-new-privileges:true" in (host["SecurityOpt"] or [])
            assert stack.exec(container, "id", "-u").stdout.strip() != "0", f"{container} runs as root"
            health = json.loads(stack.docker("inspect", "--format", "{{json .Config.Healthcheck}}", container).stdout)
            assert health, f"{container} has no healthcheck"
            assert health["Test"], f"{container} has no healthcheck"
            status = stack.docker("inspect", "--format", "{{.State.Health.Status}}", container).stdout.strip()
            assert status == "healthy"
    for container in stack.web_containers():
        write = stack.exec(container, "sh", "-c", "touch /opt/venv/x", check=False)
        assert write.returncode != 0
        assert "Read-only file system" in write.stderr
        assert stack.exec(container, "sh", "-c", "touch /tmp/x && rm /tmp/x", check=False).returncode == 0
        tools = stack.exec(
            container, "sh", "-c", "for t in gcc cc c++ make pip pip3 git; do command -v $t; done", check=False
        )
        assert not tools.stdout.strip(), f"build tools in the web image: {tools.stdout.split()}"
        assert stack.exec(container, "python3", "-m", "pip", "--version", check=False).returncode != 0


# ---- sign-in headers -------------------------------------------------------------------------------------------------

# A socket's upgrade with a sign-in header, straight to a replica from inside its container (nothing in between).
DIRECT_UPGRADE = """
import socket
s = socket.create_connection(("127.0.0.1", 8000), timeout=10)
s.sendall(b"GET /ws HTTP/1.1\\r\\nHost: web\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\nSec-WebSocket-Version: 13\\r\\n"
          b"X-Amzn-Oidc-Data: forged.by.client\\r\\n\\r\\n")
print(s.recv(200).split(b"\\r\\n")[0].decode())
s.close()
"""


def ignored_sign_ins(stack: Stack, since: str) -> int:
    lines = [
        line
        for container in stack.web_containers()
        for line in stack.docker("logs", "--since", since, container).stdout.splitlines()
    ]
    return sum('"event":"sign_in_header_ignored"' in line.replace(" ", "") for line in lines)


async def test_nginx_never_passes_on_a_clients_own_sign_in_header(stack: Stack, room: str) -> None:
    """Only an ALB with sign-in on may say who a client is (x-amzn-oidc-data, docs/sign-in.md). A replica says so in
    its log when a socket's upgrade carries that header where nobody signs in: straight to a replica, it does;
    through nginx, which clears the header, it never does."""
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1))
    for header in ("X-Amzn-Oidc-Data", "x-amzn-oidc-data", "X-AMZN-OIDC-DATA"):
        client = await ChatClient.open(stack.ws_url, headers={header: "forged.by.client"})
        await client.join(unique("forger"), room)
        await client.close()
    assert ignored_sign_ins(stack, since) == 0, "a client's own sign-in header reached a replica through nginx"

    replica = stack.web_containers()[0]
    status = stack.exec(replica, "python3", "-c", DIRECT_UPGRADE).stdout.strip()
    assert status.startswith("HTTP/1.1 101"), status
    await eventually(
        lambda: ignored_sign_ins(stack, since) == 1, timeout=10, what="the replica's note of the header it ignored"
    )
