"""Who a joining client is, when the deployment signs people in (AUTH_MODE jwt or alb; docs/sign-in.md).

PyJWT checks every signature and every payload's claims; this module decides which algorithms and keys count (from
configuration, never from the token), fetches and caches public keys within fixed bounds, and turns the claims into a
person.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import re
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .config import ConfigError, Settings
from .protocol import NAME_MAX, ErrorCode, is_name
from .ratelimit import TokenBucket

log = logging.getLogger(__name__)

# The token comes from anyone who can open a socket: it is bounded before anything parses it. 8 KiB holds any
# sensible ID token; the ALB's header holds the IdP's user claims, and an ALB passes no header over 16 KB.
TOKEN_MAX_BYTES = 8 * 1024
ALB_DATA_MAX_BYTES = 16 * 1024
# A JWKS document or one ALB key: far above any real one (a JWKS with a few RSA keys is a few KB).
KEYS_MAX_BYTES = 64 * 1024
JWKS_MAX_KEYS = 50
# One fetch, from the first byte asked to the last received; then it counts as failed.
FETCH_TIMEOUT = 5.0
# A JWKS is fetched again when a join needs it after this long, so that a key the IdP withdrew stops counting.
KEYS_MAX_AGE = 300.0
# Fetches are rationed by a token bucket, whatever the tokens ask for: a token naming a key nobody has (a new
# `kid` each time) would otherwise make the replica fetch at every join. The JWKS: one fetch per FETCH_INTERVAL.
# The ALB: its keys are fetched one `kid` at a time, so a few at once (a new replica meets the current ones), then
# one per FETCH_INTERVAL.
FETCH_INTERVAL = 30.0
ALB_FETCH_BURST = 3
ALB_KEYS_CACHED = 32
SUBJECT_MAX = 255
# The ALB's key ids are UUIDs; nothing else may go into the URL its key is fetched from.
KID_PATTERN = re.compile(r"[0-9A-Fa-f-]{1,64}")
# One segment of the ALB's header: base64url, with the "=" padding the ALB adds (RFC 7515 says none; PyJWT 2.15
# accepts it and verifies the signature over the segments as sent, padding included, which is what the ALB signs).
ALB_SEGMENT = re.compile(r"[A-Za-z0-9_-]+={0,2}")
RSA_MIN_BITS = 2048


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the WebSocket upgrade request said about who is connecting: the `?token=` of its URL, and the
    x-amzn-oidc-data header an ALB with sign-in adds (nginx clears a client's own)."""

    token: str | None = None
    alb_data: str | None = None


@dataclass(frozen=True, slots=True)
class SignedIn:
    """A person the deployment's identity provider (or the ALB) vouches for."""

    name: str  # the display name, from AUTH_NAME_CLAIM, valid as a chat name
    subject: str  # the token's `sub`: the same person whatever name they show
    moderator: bool  # AUTH_MODERATOR_CLAIM holds AUTH_MODERATOR_VALUE


class SignInRefused(Exception):
    """A join whose sign-in does not hold; `detail` is for the client and never holds the token or a key."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _invalid(detail: str) -> SignInRefused:
    return SignInRefused(ErrorCode.INVALID_TOKEN, detail)


class _KeysUnavailable(Exception):
    """Keys could not be fetched (the network, a timeout, a server error, a body too large or unreadable)."""


class _UnknownKey(Exception):
    """The key server answered that it has no such key (a 4xx): the token names a key that does not exist."""


class SignIn:
    """Checks a joining client's token (jwt) or the ALB's header (alb); in names mode, there is nothing to check."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.mode = settings.auth_mode
        self._leeway = settings.auth_leeway_seconds
        self._jwks: _JwksKeys | None = None
        self._alb: _AlbKeys | None = None
        if self.mode == "jwt" and (settings.auth_jwks_file or settings.auth_jwks_url):
            self._jwks = _JwksKeys(settings, clock)
        if self.mode == "alb":
            self._alb = _AlbKeys(settings, clock)
        # Fixed by configuration: HS256 only with a secret, RS256 and ES256 only with a JWKS. A token's own `alg`
        # only picks among these, so `none`, or HS256 keyed with a published public key, never verifies.
        self.algorithms: frozenset[str] = frozenset(
            (["HS256"] if self.mode == "jwt" and settings.auth_jwt_secret else [])
            + (["RS256", "ES256"] if self._jwks else [])
        )

    async def start(self) -> None:
        """Fetches the JWKS once ahead of the first join; a failure is logged, and joins fetch it again later."""
        if self._jwks is not None:
            await self._jwks.refresh()

    async def close(self) -> None:
        """Nothing stays open between fetches (each is one request); here for the app's startup and shutdown."""

    async def identify(self, *, token: str | None, alb_data: str | None) -> SignedIn | None:
        """The person a join is from: None in names mode (owned names apply), else a SignedIn or SignInRefused.
        `token` is the client's (the socket's `?token=` or the join's "token"); `alb_data` is the upgrade request's
        x-amzn-oidc-data header. Each mode looks only at its own."""
        if self.mode == "jwt":
            if not token:
                raise SignInRefused(ErrorCode.SIGN_IN_REQUIRED, "This chat needs you to sign in: join with a token.")
            return await self._verify_token(token)
        if self.mode == "alb":
            if not alb_data:
                raise SignInRefused(
                    ErrorCode.SIGN_IN_REQUIRED, "This chat needs you to sign in: open it through its sign-in page."
                )
            return await self._verify_alb(alb_data)
        return None

    async def _verify_token(self, token: str) -> SignedIn:
        if len(token) > TOKEN_MAX_BYTES or not token.isascii():
            raise _invalid(f"That is not a token this chat accepts (a token has at most {TOKEN_MAX_BYTES} bytes).")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid("That is not a token this chat accepts.") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            raise _invalid("That token is signed in a way this chat does not accept.")
        key: Any
        if algorithm == "HS256":
            key = self.settings.auth_jwt_secret.reveal()
        else:
            assert self._jwks is not None  # RS256 and ES256 are allowed only with a JWKS
            kid = header.get("kid")
            if kid is not None and (not isinstance(kid, str) or len(kid) > 256):
                raise _invalid("That token names its key in a way this chat does not accept.")
            key = await self._jwks.key(kid, algorithm)
        claims = self._decode(
            token,
            key,
            algorithm,
            issuer=self.settings.auth_issuer,
            audience=self.settings.auth_audience,
        )
        return self._person(claims)

    async def _verify_alb(self, data: str) -> SignedIn:
        assert self._alb is not None
        if len(data) > ALB_DATA_MAX_BYTES or not data.isascii():
            raise _invalid("The load balancer's sign-in header is not one this chat accepts.")
        segments = data.split(".")
        if len(segments) != 3 or not all(ALB_SEGMENT.fullmatch(segment) for segment in segments):
            raise _invalid("The load balancer's sign-in header is not one this chat accepts.")
        try:
            header = jwt.get_unverified_header(data)
        except jwt.PyJWTError:
            raise _invalid("The load balancer's sign-in header is not one this chat accepts.") from None
        # Checked before any key is fetched, so that a header from another ALB, or an old one, costs no fetch; the
        # signature, checked next, covers the header, so none of these can be forged into passing.
        if header.get("alg") != "ES256":
            raise _invalid("The load balancer's sign-in header is signed in a way this chat does not accept.")
        if header.get("signer") != self.settings.auth_alb_arn:
            raise _invalid("That sign-in comes from another load balancer than this chat's.")
        exp = header.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise _invalid("The load balancer's sign-in header has no expiry.")
        if exp + self._leeway < time.time():
            raise _invalid("Your sign-in has expired; sign in again.")
        kid = header.get("kid")
        if not isinstance(kid, str) or not KID_PATTERN.fullmatch(kid):
            raise _invalid("The load balancer's sign-in header names its key in a way this chat does not accept.")
        key = await self._alb.key(kid)
        # The ALB's header holds the IdP's user claims, with no audience or issuer of ours to check: the ALB's ARN
        # in the signed header is what says the sign-in is this deployment's.
        return self._person(self._decode(data, key, "ES256", issuer=None, audience=None))

    def _decode(
        self, token: str, key: Any, algorithm: str, *, issuer: str | None, audience: str | None
    ) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=issuer,
                audience=audience,
                leeway=self._leeway,
                # A token must expire; the ALB puts its expiry in the header (checked before), and any in the payload
                # is checked too. Without AUTH_AUDIENCE a token's `aud` is not looked at (docs/sign-in.md).
                options={"require": ["exp"] if self.mode == "jwt" else [], "verify_aud": audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise _invalid("Your sign-in has expired; sign in again.") from None
        except jwt.ImmatureSignatureError:
            raise _invalid("That token is not valid yet.") from None
        except jwt.InvalidAudienceError:
            raise _invalid("That token is meant for another service.") from None
        except jwt.InvalidIssuerError:
            raise _invalid("That token comes from an issuer this chat does not accept.") from None
        except jwt.exceptions.InvalidSubjectError:
            raise _invalid('That token has no "sub" claim this chat can use.') from None
        except jwt.MissingRequiredClaimError as error:
            raise _invalid(f'That token has no "{error.claim}" claim.') from None
        except jwt.InvalidSignatureError:
            raise _invalid("That token's signature does not match.") from None
        except jwt.PyJWTError:
            raise _invalid("That is not a token this chat accepts.") from None

    def _person(self, claims: dict[str, Any]) -> SignedIn:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not 1 <= len(subject) <= SUBJECT_MAX or not subject.isprintable():
            raise _invalid('That token has no "sub" claim this chat can use.')
        claim = self.settings.auth_name_claim
        raw = claims.get(claim)
        if not isinstance(raw, str):
            raise _invalid(f'That token has no "{claim}" to take your name from.')
        name = raw.strip()
        if not is_name(name):
            raise _invalid(
                f'The "{claim}" your sign-in gives is not a name this chat can show: 1 to {NAME_MAX} characters, '
                "each one a name may hold."
            )
        return SignedIn(name=name, subject=subject, moderator=self._is_moderator(claims))

    def _is_moderator(self, claims: dict[str, Any]) -> bool:
        claim, value = self.settings.auth_moderator_claim, self.settings.auth_moderator_value
        if claim is None or value is None:
            return False
        held = claims.get(claim)
        if isinstance(held, str):
            return held == value
        return isinstance(held, list) and value in held


class _JwksKeys:
    """The keys of the deployment's JWKS, by `kid`: from AUTH_JWKS_FILE (read once, at start) or AUTH_JWKS_URL
    (fetched at start, again when older than KEYS_MAX_AGE or when a token names a `kid` it lacks; rationed)."""

    def __init__(self, settings: Settings, clock: Callable[[], float]) -> None:
        self._url = settings.auth_jwks_url
        self._clock = clock
        self._keys: dict[str, tuple[str, Any]] = {}  # kid -> (algorithm, key); "" for a key without a kid
        self._fetched: float | None = None
        self._failed = False
        self._lock = asyncio.Lock()
        self._fetches = _bucket(1, clock)
        if settings.auth_jwks_file:
            path = settings.auth_jwks_file
            try:
                with Path(path).open("rb") as file:
                    body = file.read(KEYS_MAX_BYTES + 1)
            except OSError as error:
                raise ConfigError(f"AUTH_JWKS_FILE={path} cannot be read: {error.strerror}") from None
            try:
                self._keys = _parse_jwks(body)
            except _KeysUnavailable as error:
                raise ConfigError(f"AUTH_JWKS_FILE={path}: {error}") from None

    async def key(self, kid: str | None, algorithm: str) -> Any:
        if self._url is not None:
            known = self._find(kid, algorithm)
            stale = self._fetched is None or self._clock() - self._fetched >= KEYS_MAX_AGE
            if known is None or stale:
                await self.refresh()
        found = self._find(kid, algorithm)
        if found is not None:
            return found
        if kid is not None and kid in self._keys:
            raise _invalid("That token is signed in a way its key does not allow.")
        if self._url is not None and self._failed and not self._keys:
            raise SignInRefused(ErrorCode.UNAVAILABLE, "Signing in is unavailable for a moment; try again shortly.")
        raise _invalid("That token is signed with a key this chat does not know.")

    def _find(self, kid: str | None, algorithm: str) -> Any:
        if kid is None:
            # A token without a `kid` can only mean the one key there is.
            entries = list(self._keys.values())
            entry = entries[0] if len(entries) == 1 else None
        else:
            entry = self._keys.get(kid)
        if entry is None or entry[0] != algorithm:
            return None
        return entry[1]

    async def refresh(self) -> None:
        """Fetches the JWKS, unless one is being fetched (then waits for it) or the ration is spent; a failure keeps
        the keys there were (a key that was good five minutes ago beats refusing everyone while the IdP is down)."""
        if self._url is None:
            return
        if self._lock.locked():
            async with self._lock:
                return
        if self._fetches.take(self._clock()) > 0:
            return
        async with self._lock:
            try:
                self._keys = _parse_jwks(await _fetch(self._url, "application/json"))
            except (_KeysUnavailable, _UnknownKey) as error:
                self._failed = True
                log.warning(
                    "sign-in keys unavailable", extra={"event": "sign_in_keys_unavailable", "error": str(error)}
                )
                return
            self._fetched = self._clock()
            self._failed = False


class _AlbKeys:
    """The ALB's public keys, one PEM per `kid`, fetched from AUTH_ALB_KEYS_URL when a header names a new one and
    kept (the most recently used ALB_KEYS_CACHED): the ALB's key for a `kid` never changes."""

    def __init__(self, settings: Settings, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._clock = clock
        self._keys: OrderedDict[str, ec.EllipticCurvePublicKey] = OrderedDict()
        self._lock = asyncio.Lock()
        self._fetches = _bucket(ALB_FETCH_BURST, clock)

    async def key(self, kid: str) -> ec.EllipticCurvePublicKey:
        key = self._keys.get(kid)
        if key is None:
            # One fetch at a time: joins that name the same new key wait for the first one's fetch.
            async with self._lock:
                key = self._keys.get(kid)
                if key is None:
                    key = await self._fetch(kid)
        self._keys.move_to_end(kid)
        return key

    async def _fetch(self, kid: str) -> ec.EllipticCurvePublicKey:
        if self._fetches.take(self._clock()) > 0:
            raise SignInRefused(ErrorCode.UNAVAILABLE, "Signing in is unavailable for a moment; try again shortly.")
        try:
            body = await _fetch(self._settings.alb_keys_url_for(kid), "application/x-pem-file")
            key = serialization.load_pem_public_key(body)
        except _UnknownKey:
            raise _invalid("That sign-in is signed with a key the load balancer does not have.") from None
        except (_KeysUnavailable, ValueError) as error:
            log.warning("sign-in keys unavailable", extra={"event": "sign_in_keys_unavailable", "error": str(error)})
            raise SignInRefused(
                ErrorCode.UNAVAILABLE, "Signing in is unavailable for a moment; try again shortly."
            ) from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            log.warning("sign-in key is not P-256", extra={"event": "sign_in_keys_unavailable", "kid": kid})
            raise SignInRefused(ErrorCode.UNAVAILABLE, "Signing in is unavailable for a moment; try again shortly.")
        self._keys[kid] = key
        while len(self._keys) > ALB_KEYS_CACHED:
            self._keys.popitem(last=False)
        return key


def _bucket(burst: int, clock: Callable[[], float]) -> TokenBucket:
    bucket = TokenBucket(1 / FETCH_INTERVAL, burst)
    bucket.stamp = clock()  # the bucket's time is the clock's, which tests move by hand
    return bucket


def _parse_jwks(body: bytes) -> dict[str, tuple[str, Any]]:
    """The usable signing keys of a JWKS: RSA of at least 2048 bits for RS256, P-256 for ES256. Anything else
    (symmetric keys, encryption keys, other algorithms) is left out: no key is used for an algorithm it is not for."""
    if len(body) > KEYS_MAX_BYTES:
        raise _KeysUnavailable(f"the JWKS is over {KEYS_MAX_BYTES} bytes")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _KeysUnavailable("the JWKS is not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or len(entries) > JWKS_MAX_KEYS:
        raise _KeysUnavailable(f'the JWKS needs "keys": a list of at most {JWKS_MAX_KEYS}')
    keys: dict[str, tuple[str, Any]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue
        algorithm, key = jwk.algorithm_name, jwk.key
        rsa_ok = algorithm == "RS256" and isinstance(key, rsa.RSAPublicKey) and key.key_size >= RSA_MIN_BITS
        ec_ok = (
            algorithm == "ES256" and isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
        )
        if rsa_ok or ec_ok:
            keys[jwk.key_id or ""] = (algorithm, key)
    if not keys:
        raise _KeysUnavailable("the JWKS has no RS256 (RSA, 2048 bits or more) or ES256 (P-256) public key")
    return keys


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Keys come from the configured URL itself: a redirect (to http://, or anywhere) is a failed fetch."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


async def _fetch(url: str, accept: str) -> bytes:
    """GETs `url` in a worker thread (urllib blocks), within FETCH_TIMEOUT and KEYS_MAX_BYTES."""
    try:
        async with asyncio.timeout(FETCH_TIMEOUT + 1):
            return await asyncio.to_thread(_get, url, accept)
    except TimeoutError:
        raise _KeysUnavailable(f"no answer from {url} within {FETCH_TIMEOUT} s") from None


def _get(url: str, accept: str) -> bytes:
    deadline = time.monotonic() + FETCH_TIMEOUT
    request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "infinite-chat"})
    try:
        with _OPENER.open(request, timeout=FETCH_TIMEOUT) as response:
            if not isinstance(response, http.client.HTTPResponse) or response.status != 200:
                raise _KeysUnavailable(f"{url} answered {getattr(response, 'status', '?')}")
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > KEYS_MAX_BYTES:
                raise _KeysUnavailable(f"{url} sent over {KEYS_MAX_BYTES} bytes")
            body = bytearray()
            while chunk := response.read1(16 * 1024):
                body += chunk
                if len(body) > KEYS_MAX_BYTES:
                    raise _KeysUnavailable(f"{url} sent over {KEYS_MAX_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise _KeysUnavailable(f"{url} took over {FETCH_TIMEOUT} s")
            return bytes(body)
    except urllib.error.HTTPError as error:
        if 400 <= error.code < 500:
            raise _UnknownKey(f"{url} answered {error.code}") from None
        raise _KeysUnavailable(f"{url} answered {error.code}") from None
    except (OSError, http.client.HTTPException) as error:
        raise _KeysUnavailable(f"{url}: {error}") from None
