"""The Quart application of one replica: the page, the HTTP API, health, metrics, and the chat socket at /ws."""

from __future__ import annotations

import hashlib
import re
from importlib.resources import files
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from .broker import BrokerUnavailable
from .config import Settings
from .protocol import MESSAGE_ID_PATTERN, ROOM_PATTERN, HttpError, is_name
from .replica import Replica
from .websocket import ChatSocketRoute

API_LIMIT_MAX = 100
ROOM_RULE = "A room name has 1 to 32 of a-z, 0-9, - and _."
LIMIT_RULE = f"limit must be a whole number from 1 to {API_LIMIT_MAX}."
STATIC = files(__package__).joinpath("static")

# The page may talk only to its own origin. CSP 3 lets connect-src 'self' cover ws:// and wss:// of that origin,
# but browsers that predate it do not, so the socket's own URLs are named too, built from the request's Host.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'{sockets}; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'"
)
# What a Host header may hold (name or IPv4 or [IPv6], optional port): anything else could inject CSP directives,
# and gets no socket sources (connect-src 'self' still covers them in current browsers).
HOST_PATTERN = re.compile(r"(?:[a-z0-9-]+(?:\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])(?::\d{1,5})?")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def json_response(body: dict[str, Any] | bytes, status: int = 200) -> Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(data, status=status, content_type="application/json")


def content_security_policy(host: str | None) -> str:
    host = (host or "").strip().lower()
    sockets = f" ws://{host} wss://{host}" if HOST_PATTERN.fullmatch(host) else ""
    return CONTENT_SECURITY_POLICY.format(sockets=sockets)


def create_app(settings: Settings | None = None) -> Quart:
    settings = settings or Settings.from_env()
    app = Quart(__name__, static_folder=None)
    # Werkzeug answers "//" in a path with a redirect to an absolute URL built from the request's Host: any Host a
    # client sends, in a response a shared cache may keep. Such paths are simply not found.
    app.url_map.merge_slashes = False
    app.url_map.redirect_defaults = False
    replica = Replica(settings)
    app.extensions["replica"] = replica
    app.before_serving(replica.start)
    app.after_serving(replica.stop)
    assets = {
        asset.name: asset.read_bytes() for asset in STATIC.iterdir() if asset.is_file() and asset.name != "index.html"
    }
    page = _page(assets)

    @app.after_request
    async def security_headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if response.content_type and response.content_type.startswith("text/html"):
            response.headers["Content-Security-Policy"] = content_security_policy(request.headers.get("Host"))
        return response

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        code = (error.name or "error").lower().replace(" ", "_")
        return json_response({"error": code, "detail": error.description}, error.code or 500)

    @app.get("/")
    async def index() -> Response:
        return Response(page, content_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    @app.get("/static/<path:name>")
    async def static(name: str) -> Response:
        asset = assets.get(name)
        if asset is None:
            return json_response({"error": HttpError.NOT_FOUND, "detail": "No such file."}, 404)
        # URLs carry the file's hash (see _page), so a file may be cached for good.
        return Response(
            asset, content_type=_content_type(name), headers={"Cache-Control": "public, max-age=31536000, immutable"}
        )

    @app.get("/health")
    async def health() -> Response:
        # Liveness only: a replica whose Redis is away is still alive (and will reconnect by itself).
        status = "draining" if replica.draining else "ok"
        return json_response({"status": status, "replica": settings.replica_name}, 503 if replica.draining else 200)

    @app.get("/ready")
    async def ready() -> Response:
        try:
            await replica.broker.ping()
        except BrokerUnavailable as error:
            return json_response({"status": "unavailable", "replica": settings.replica_name, "reason": str(error)}, 503)
        if replica.draining:
            return json_response({"status": "draining", "replica": settings.replica_name, "reason": "restarting"}, 503)
        return json_response({"status": "ready", "replica": settings.replica_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), content_type=CONTENT_TYPE_LATEST)

    @app.get("/ws")
    async def ws_over_http() -> Response:
        return json_response({"error": HttpError.UPGRADE_REQUIRED, "detail": "/ws is a WebSocket endpoint."}, 426)

    @app.get("/api/rooms/<room>/messages")
    async def room_messages(room: str) -> Response:
        if not ROOM_PATTERN.fullmatch(room):
            return _bad_request(HttpError.INVALID_ROOM, ROOM_RULE)
        limit = _limit(request.args.get("limit", str(settings.history_size)))
        if limit is None:
            return _bad_request(HttpError.INVALID_LIMIT, LIMIT_RULE)
        before = request.args.get("before")
        if before is not None and not MESSAGE_ID_PATTERN.fullmatch(before):
            return _bad_request(HttpError.INVALID_BEFORE, "before must be a message id, as in a message's id field.")
        try:
            # One more than asked tells whether scrolling further back will find anything.
            found = await replica.broker.recent(room, limit + 1, before)
        except BrokerUnavailable:
            return json_response(
                {"error": HttpError.UNAVAILABLE, "detail": "History is unavailable for a moment."}, 503
            )
        messages = found[-limit:]
        return json_response(
            orjson.dumps(
                {
                    "room": room,
                    "messages": [orjson.Fragment(delivery.frame) for delivery in messages],
                    "more": len(found) > limit,
                }
            )
        )

    @app.get("/api/moderation/log")
    async def moderation_log() -> Response:
        # A moderator's token (or, signed in, the sign-in that makes one) as a bearer token; the ALB's header.
        authorization = request.headers.get("Authorization", "")
        bearer = authorization[7:].strip() if authorization[:7].lower() == "bearer " else None
        try:
            moderator = await replica.moderator_of(bearer, request.headers.get("x-amzn-oidc-data"))
        except BrokerUnavailable:
            return json_response({"error": HttpError.UNAVAILABLE, "detail": "Try again in a moment."}, 503)
        if moderator is None:
            detail = "Send a moderator's token: Authorization: Bearer <token>."
            return json_response({"error": HttpError.UNAUTHORIZED, "detail": detail}, 401)
        if not moderator:
            return json_response({"error": HttpError.NOT_MODERATOR, "detail": "Only moderators can read this."}, 403)
        limit = _limit(request.args.get("limit", str(API_LIMIT_MAX)))
        if limit is None:
            return _bad_request(HttpError.INVALID_LIMIT, LIMIT_RULE)
        before = request.args.get("before")
        if before is not None and not MESSAGE_ID_PATTERN.fullmatch(before):
            return _bad_request(HttpError.INVALID_BEFORE, "before must be an entry id, as in an entry's id field.")
        try:
            # One more than asked tells whether there is more further back.
            found = await replica.broker.audit_log(limit + 1, before)
        except BrokerUnavailable:
            return json_response({"error": HttpError.UNAVAILABLE, "detail": "Try again in a moment."}, 503)
        entries = [orjson.Fragment(b'{"id":"' + entry_id.encode() + b'",' + body[1:]) for entry_id, body in found]
        return json_response(orjson.dumps({"entries": entries[:limit], "more": len(found) > limit}))

    @app.get("/api/rooms/<room>/online")
    async def room_online(room: str) -> Response:
        if not ROOM_PATTERN.fullmatch(room):
            return _bad_request(HttpError.INVALID_ROOM, ROOM_RULE)
        limit = _limit(request.args.get("limit", str(API_LIMIT_MAX)))
        if limit is None:
            return _bad_request(HttpError.INVALID_LIMIT, LIMIT_RULE)
        after = request.args.get("after")
        if after is not None and not is_name(after):
            return _bad_request(HttpError.INVALID_AFTER, "after must be a name, as in the online list.")
        try:
            # One more than asked tells whether there is a next page.
            online = await replica.broker.online(room, limit + 1, after)
        except BrokerUnavailable:
            return json_response(
                {"error": HttpError.UNAVAILABLE, "detail": "Who is online is unavailable for a moment."}, 503
            )
        names = online.names[:limit]
        return json_response(
            {
                "room": room,
                "online": names,
                "online_count": online.count,
                "next": names[-1] if len(online.names) > limit else None,
            }
        )

    app.asgi_app = ChatSocketRoute(replica, app.asgi_app)  # type: ignore[method-assign]
    return app


def _limit(raw: str) -> int | None:
    """An API page's size, or None when `raw` is not a whole number from 1 to API_LIMIT_MAX."""
    # Length first: int() of thousands of digits is slow, and past 4,300 Python refuses it with an error.
    if len(raw) <= 3 and raw.isascii() and raw.isdigit() and 1 <= int(raw) <= API_LIMIT_MAX:
        return int(raw)
    return None


def _bad_request(code: HttpError, detail: str) -> Response:
    return json_response({"error": code, "detail": detail}, 400)


def _page(assets: dict[str, bytes]) -> bytes:
    """index.html with every asset URL versioned by the asset's content hash."""
    html = STATIC.joinpath("index.html").read_text(encoding="utf-8")
    for name, content in assets.items():
        digest = hashlib.sha256(content).hexdigest()[:12]
        html = html.replace(f'/static/{name}"', f'/static/{name}?v={digest}"')
    return html.encode()


def _content_type(name: str) -> str:
    kinds = {
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".svg": "image/svg+xml",
        ".png": "image/png",
        ".ico": "image/x-icon",
        ".webmanifest": "application/manifest+json",
    }
    for suffix, kind in kinds.items():
        if name.endswith(suffix):
            return kind
    return "application/octet-stream"
