"""Signing in (signin.py): tokens of AUTH_MODE=jwt and the ALB's x-amzn-oidc-data of AUTH_MODE=alb, verified with
keys made here and served, where they are fetched, by a key server on 127.0.0.1; and the AUTH_* settings."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from infinite_chat.config import ConfigError, Settings
from infinite_chat.protocol import ErrorCode
from infinite_chat.signin import (
    ALB_FETCH_BURST,
    FETCH_INTERVAL,
    KEYS_MAX_AGE,
    KEYS_MAX_BYTES,
    TOKEN_MAX_BYTES,
    SignedIn,
    SignIn,
    SignInRefused,
)

SECRET = "a-secret-of-at-least-thirty-two-bytes!"
ISSUER = "https://id.example.org/"
AUDIENCE = "infinite-chat"
ARN = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:loadbalancer/app/chat/0123456789abcdef"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())


# ---- keys, tokens and the key server ------------------------------------------------------------------------------


def jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str, **extra: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        public: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    else:
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {**public, "kid": kid, "use": "sig", **extra}


def jwks(*keys: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "user-1",
        "name": "Ann",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not None}


def token(key: Any = SECRET, algorithm: str = "HS256", kid: str | None = None, **changes: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**changes), key, algorithm=algorithm, headers=headers)


def b64(data: bytes, *, padded: bool = False) -> str:
    encoded = base64.urlsafe_b64encode(data).decode()
    return encoded if padded else encoded.rstrip("=")


def unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"


def padded_json(document: dict[str, Any]) -> str:
    """The document's base64url as the ALB writes it, with "=" padding: grown by a filler field until it has some."""
    for filler in range(3):
        data = json.dumps({**document, **({"_": "x" * filler} if filler else {})}).encode()
        if len(data) % 3:
            return b64(data, padded=True)
    raise AssertionError("unreachable: one of three lengths is not a multiple of 3")


def alb_data(
    key: ec.EllipticCurvePrivateKey = EC_KEY,
    *,
    kid: str,
    signer: str = ARN,
    exp: float | None = None,
    payload: dict[str, Any] | None = None,
) -> str:
    """An x-amzn-oidc-data header as the ALB makes one: ES256 over the padded segments, each segment padded."""
    header = {
        "typ": "JWT",
        "kid": kid,
        "alg": "ES256",
        "iss": "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_Example",
        "client": "4fmvht22tjrgd7d3k3tghttct7",
        "signer": signer,
        "exp": int(time.time()) + 120 if exp is None else exp,
    }
    body = {"sub": "23d498b2-3031-70d2-8a15-49dd886a087b", "email": "ann@example.org", "name": "Ann", **(payload or {})}
    signing_input = f"{padded_json(header)}.{padded_json(body)}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    signature = b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"), padded=True)
    return f"{signing_input}.{signature}"


class KeyServer:
    """An HTTP server on 127.0.0.1 that answers each path with what `pages` holds (else 404) and counts requests."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[int, bytes]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                status, body = server.pages.get(self.path, (404, b"no such key"))
                self.send_response(status)
                if status in (301, 302):
                    self.send_header("Location", "http://127.0.0.1:1/elsewhere")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # A short poll: shutdown() waits for the loop to look, at every test's end.
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def fetched(self, path: str) -> int:
        return self.requests.count(path)


@pytest.fixture
def keys() -> Iterator[KeyServer]:
    server = KeyServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


class Clock:
    """The fetch ration's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def sign_in(env: dict[str, str], clock: Clock | None = None) -> SignIn:
    return SignIn(Settings.from_env(env), clock=clock or Clock())


async def refused(signin: SignIn, *, token: str | None = None, alb_data: str | None = None) -> SignInRefused:
    with pytest.raises(SignInRefused) as caught:
        await signin.identify(token=token, alb_data=alb_data)
    return caught.value


HS256 = {"AUTH_MODE": "jwt", "AUTH_JWT_SECRET": SECRET, "AUTH_ISSUER": ISSUER, "AUTH_AUDIENCE": AUDIENCE}


@pytest.fixture
def jwks_file(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks(jwk(RSA_KEY, "rsa-1"), jwk(EC_KEY, "ec-1")))
    return {"AUTH_MODE": "jwt", "AUTH_JWKS_FILE": str(path), "AUTH_ISSUER": ISSUER, "AUTH_AUDIENCE": AUDIENCE}


# ---- names mode ---------------------------------------------------------------------------------------------------


async def test_names_mode_leaves_the_join_to_owned_names() -> None:
    signin = sign_in({})
    assert signin.mode == "names"
    assert await signin.identify(token=token(), alb_data="anything") is None


# ---- jwt mode -----------------------------------------------------------------------------------------------------


async def test_an_hs256_token_signs_its_person_in_with_the_name_trimmed() -> None:
    person = await sign_in(HS256).identify(token=token(name="  Ann Lee "), alb_data=None)
    assert person == SignedIn(name="Ann Lee", subject="user-1", moderator=False)


@pytest.mark.parametrize(("key", "algorithm", "kid"), [(RSA_KEY, "RS256", "rsa-1"), (EC_KEY, "ES256", "ec-1")])
async def test_rs256_and_es256_tokens_verify_with_the_keys_of_a_jwks_file(
    jwks_file: dict[str, str], key: Any, algorithm: str, kid: str
) -> None:
    person = await sign_in(jwks_file).identify(token=token(key, algorithm, kid), alb_data=None)
    assert person == SignedIn(name="Ann", subject="user-1", moderator=False)


async def test_a_token_without_kid_uses_the_only_key_there_is(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks(jwk(EC_KEY, "ec-1")))
    signin = sign_in({"AUTH_MODE": "jwt", "AUTH_JWKS_FILE": str(path)})
    assert await signin.identify(token=token(EC_KEY, "ES256", aud=None), alb_data=None) is not None


async def test_a_join_without_a_token_is_told_to_sign_in() -> None:
    signin = sign_in(HS256)
    for missing in (None, ""):
        assert (await refused(signin, token=missing)).code is ErrorCode.SIGN_IN_REQUIRED
    # In jwt mode the ALB's header counts for nothing.
    assert (await refused(signin, alb_data=alb_data(kid=str(uuid.uuid4())))).code is ErrorCode.SIGN_IN_REQUIRED


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        # Times as seconds from now, made into times when the test runs: a suite can run long after collection.
        ({"exp": -120}, "expired"),
        ({"exp": None}, '"exp"'),
        ({"nbf": 600}, "not valid yet"),
        ({"iat": 600}, "not valid yet"),
        ({"aud": "another-service"}, "another service"),
        ({"aud": None}, '"aud"'),
        ({"iss": "https://evil.example.org/"}, "issuer"),
        ({"sub": None}, '"sub"'),
        ({"sub": 42}, '"sub"'),
    ],
)
async def test_a_token_whose_claims_do_not_hold_is_refused(changes: dict[str, Any], says: str) -> None:
    now = int(time.time())
    timed = {
        key: now + value if key in ("exp", "nbf", "iat") and value is not None else value
        for key, value in changes.items()
    }
    refusal = await refused(sign_in(HS256), token=token(**timed))
    assert refusal.code is ErrorCode.INVALID_TOKEN
    assert says in refusal.detail


async def test_the_leeway_forgives_a_little_clock_skew_and_no_more() -> None:
    signin = sign_in({**HS256, "AUTH_LEEWAY_SECONDS": "30"})
    assert await signin.identify(token=token(exp=int(time.time()) - 10), alb_data=None) is not None
    assert (await refused(signin, token=token(exp=int(time.time()) - 60))).code is ErrorCode.INVALID_TOKEN


async def test_without_issuer_and_audience_set_neither_is_checked() -> None:
    signin = sign_in({"AUTH_MODE": "jwt", "AUTH_JWT_SECRET": SECRET})
    assert await signin.identify(token=token(iss="anyone", aud="anything"), alb_data=None) is not None


async def test_a_wrong_signature_is_refused(jwks_file: dict[str, str]) -> None:
    forged = token(ec.generate_private_key(ec.SECP256R1()), "ES256", "ec-1")
    refusal = await refused(sign_in(jwks_file), token=forged)
    assert (refusal.code, refusal.detail) == (ErrorCode.INVALID_TOKEN, "That token's signature does not match.")
    assert (await refused(sign_in(HS256), token=token("another-secret-of-thirty-two-bytes!!"))).detail == (
        "That token's signature does not match."
    )


async def test_alg_none_is_refused(jwks_file: dict[str, str]) -> None:
    for header in ({"alg": "none", "typ": "JWT"}, {"alg": "none", "kid": "ec-1"}):
        bare = unsigned(header, claims()) + "."
        for signin in (sign_in(HS256), sign_in(jwks_file)):
            assert (await refused(signin, token=bare)).code is ErrorCode.INVALID_TOKEN


def hs256_keyed_with(secret: bytes, kid: str) -> str:
    signing_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": kid}, claims())
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


async def test_an_hs256_token_keyed_with_the_public_key_is_refused(jwks_file: dict[str, str]) -> None:
    """Algorithm confusion: the RSA public key is published, so a verifier that let the token choose HS256 and used
    that key as the secret would accept anyone's token."""
    confused = hs256_keyed_with(pem(RSA_KEY), "rsa-1")
    assert (await refused(sign_in(jwks_file), token=confused)).code is ErrorCode.INVALID_TOKEN
    both = sign_in({**jwks_file, "AUTH_JWT_SECRET": SECRET})  # HS256 allowed, but only with the secret
    assert (await refused(both, token=confused)).detail == "That token's signature does not match."


async def test_only_the_configured_algorithms_count(jwks_file: dict[str, str]) -> None:
    assert sign_in(HS256).algorithms == {"HS256"}
    assert sign_in(jwks_file).algorithms == {"RS256", "ES256"}
    assert (await refused(sign_in(HS256), token=token(RSA_KEY, "RS256", "rsa-1"))).code is ErrorCode.INVALID_TOKEN
    assert (await refused(sign_in(jwks_file), token=token())).code is ErrorCode.INVALID_TOKEN
    # A known kid with another algorithm than its key's: the EC key does not verify RS256.
    mixed = token(RSA_KEY, "RS256", "ec-1")
    assert (
        await refused(sign_in(jwks_file), token=mixed)
    ).detail == "That token is signed in a way its key does not allow."
    hs384 = jwt.encode(claims(), SECRET * 2, algorithm="HS384")
    assert (await refused(sign_in(HS256), token=hs384)).code is ErrorCode.INVALID_TOKEN


@pytest.mark.filterwarnings("ignore:The RSA key is 1024 bits")  # PyJWT warns when signing with it: the point
async def test_a_jwks_offers_only_signing_keys_of_the_allowed_kinds(tmp_path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "jwks.json"
    path.write_bytes(
        jwks(
            {"kty": "oct", "kid": "oct-1", "k": b64(SECRET.encode())},  # a symmetric key has no place in a JWKS
            jwk(small, "small-1"),
            jwk(RSA_KEY, "rs384-1", alg="RS384"),
            jwk(RSA_KEY, "enc-1", use="enc"),
            jwk(EC_KEY, "ec-1"),
        )
    )
    signin = sign_in({"AUTH_MODE": "jwt", "AUTH_JWKS_FILE": str(path)})
    assert await signin.identify(token=token(EC_KEY, "ES256", "ec-1", aud=None), alb_data=None) is not None
    for forged in (
        hs256_keyed_with(SECRET.encode(), "oct-1"),
        token(small, "RS256", "small-1"),
        token(RSA_KEY, "RS256", "rs384-1"),
        token(RSA_KEY, "RS256", "enc-1"),
    ):
        assert (await refused(signin, token=forged)).code is ErrorCode.INVALID_TOKEN


@pytest.mark.parametrize(
    "garbage",
    [
        "x",
        "a.b.c",
        "a.b",
        "....",
        "eyJhbGciOiJIUzI1NiJ9.!!!!.????",
        "ééé.ééé.ééé",
        "Bearer " + token(),
        token() + "!!!!",
        b64(b"[1, 2]") + "." + b64(b"{}") + ".",
    ],
)
async def test_garbage_is_refused_as_an_invalid_token(garbage: str) -> None:
    assert (await refused(sign_in(HS256), token=garbage)).code is ErrorCode.INVALID_TOKEN


async def test_an_over_long_token_is_refused_before_it_is_parsed() -> None:
    long = token(name="Ann", padding="x" * TOKEN_MAX_BYTES)
    refusal = await refused(sign_in(HS256), token=long)
    assert refusal.code is ErrorCode.INVALID_TOKEN
    assert str(TOKEN_MAX_BYTES) in refusal.detail


@pytest.mark.parametrize(
    ("name", "says"),
    [
        (None, 'no "name"'),
        (42, 'no "name"'),
        ("   ", "not a name"),
        ("Ann\x07", "not a name"),
        ("A" * 100, "not a name"),
        ("Ann\u202e", "not a name"),
    ],
)
async def test_a_name_claim_that_is_no_chat_name_is_refused(name: object, says: str) -> None:
    refusal = await refused(sign_in(HS256), token=token(name=name))
    assert refusal.code is ErrorCode.INVALID_TOKEN
    assert says in refusal.detail


async def test_the_name_comes_from_the_claim_configured() -> None:
    signin = sign_in({**HS256, "AUTH_NAME_CLAIM": "preferred_username"})
    person = await signin.identify(token=token(preferred_username="ann.lee"), alb_data=None)
    assert person is not None
    assert person.name == "ann.lee"


@pytest.mark.parametrize(
    ("groups", "moderator"),
    [("moderators", True), (["staff", "moderators"], True), ("staff", False), (["staff"], False), (None, False)],
)
async def test_a_moderator_is_one_whose_claim_is_or_holds_the_value(groups: object, moderator: bool) -> None:
    signin = sign_in({**HS256, "AUTH_MODERATOR_CLAIM": "groups", "AUTH_MODERATOR_VALUE": "moderators"})
    person = await signin.identify(token=token(groups=groups), alb_data=None)
    assert person is not None
    assert person.moderator is moderator


async def test_without_a_moderator_claim_configured_nobody_is_one_by_claim() -> None:
    person = await sign_in(HS256).identify(token=token(groups=["moderators"], role="moderators"), alb_data=None)
    assert person is not None
    assert not person.moderator


async def test_a_refusal_never_repeats_the_token() -> None:
    signin = sign_in(HS256)
    for bad in (token(exp=1), token("another-secret-of-thirty-two-bytes!!"), token(name="\x00")):
        refusal = await refused(signin, token=bad)
        for part in bad.split("."):
            assert part not in refusal.detail
            assert part not in str(refusal)
        assert SECRET not in refusal.detail


# ---- jwt mode with a JWKS URL -------------------------------------------------------------------------------------


async def test_a_jwks_url_is_fetched_once_and_its_keys_kept(keys: KeyServer) -> None:
    keys.pages["/jwks"] = (200, jwks(jwk(RSA_KEY, "rsa-1")))
    signin = sign_in({"AUTH_MODE": "jwt", "AUTH_JWKS_URL": f"{keys.url}/jwks", "AUTH_AUDIENCE": AUDIENCE})
    await signin.start()
    for _ in range(20):
        assert await signin.identify(token=token(RSA_KEY, "RS256", "rsa-1"), alb_data=None) is not None
    assert keys.fetched("/jwks") == 1


async def test_a_rotated_key_is_fetched_once_when_a_token_names_it(keys: KeyServer) -> None:
    keys.pages["/jwks"] = (200, jwks(jwk(RSA_KEY, "rsa-1")))
    clock = Clock()
    signin = sign_in({"AUTH_MODE": "jwt", "AUTH_JWKS_URL": f"{keys.url}/jwks"}, clock)
    await signin.start()
    new_key = ec.generate_private_key(ec.SECP256R1())
    keys.pages["/jwks"] = (200, jwks(jwk(RSA_KEY, "rsa-1"), jwk(new_key, "ec-2")))
    clock.now += FETCH_INTERVAL
    for _ in range(10):
        assert await signin.identify(token=token(new_key, "ES256", "ec-2", aud=None), alb_data=None) is not None
    assert keys.fetched("/jwks") == 2


async def test_tokens_naming_unknown_keys_cost_at_most_one_fetch_per_interval(keys: KeyServer) -> None:
    keys.pages["/jwks"] = (200, jwks(jwk(RSA_KEY, "rsa-1")))
    clock = Clock()
    signin = sign_in({"AUTH_MODE": "jwt", "AUTH_JWKS_URL": f"{keys.url}/jwks"}, clock)
    await signin.start()
    intervals = 3
    for _ in range(intervals):
        for _ in range(40):
            hostile = token(RSA_KEY, "RS256", str(uuid.uuid4()))
            assert (await refused(signin, token=hostile)).code is ErrorCode.INVALID_TOKEN
        clock.now += FETCH_INTERVAL
    assert keys.fetched("/jwks") <= 1 + intervals
    # The good key still works throughout.
    assert await signin.identify(token=token(RSA_KEY, "RS256", "rsa-1", aud=None), alb_data=None) is not None


async def test_the_jwks_is_fetched_again_once_it_is_old(keys: KeyServer) -> None:
    keys.pages["/jwks"] = (200, jwks(jwk(RSA_KEY, "rsa-1")))
    clock = Clock()
    signin = sign_in({"AUTH_MODE": "jwt", "AUTH_JWKS_URL": f"{keys.url}/jwks"}, clock)
    await signin.start()
    keys.pages["/jwks"] = (200, jwks(jwk(EC_KEY, "ec-1")))  # the IdP withdrew rsa-1
    clock.now += KEYS_MAX_AGE
    assert (await refused(signin, token=token(RSA_KEY, "RS256", "rsa-1", aud=None))).code is ErrorCode.INVALID_TOKEN
    assert keys.fetched("/jwks") == 2


async def test_an_unreachable_jwks_makes_joins_try_again_and_keeps_the_keys_it_had(keys: KeyServer) -> None:
    clock = Clock()
    down = sign_in({"AUTH_MODE": "jwt", "AUTH_JWKS_URL": f"{keys.url}/missing"}, clock)
    await down.start()  # logged, not raised: the replica starts, and joins try again later
    assert (await refused(down, token=token(RSA_KEY, "RS256", "rsa-1"))).code is ErrorCode.UNAVAILABLE

    keys.pages["/jwks"] = (200, jwks(jwk(RSA_KEY, "rsa-1")))
    signin = sign_in({"AUTH_MODE": "jwt", "AUTH_JWKS_URL": f"{keys.url}/jwks"}, clock)
    await signin.start()
    keys.pages["/jwks"] = (500, b"down")
    clock.now += KEYS_MAX_AGE
    assert await signin.identify(token=token(RSA_KEY, "RS256", "rsa-1", aud=None), alb_data=None) is not None


@pytest.mark.parametrize(
    "page",
    [
        (200, b"x" * (KEYS_MAX_BYTES + 1)),
        (200, b"not json"),
        (200, b'{"keys": "none"}'),
        (302, b""),
    ],
)
async def test_a_jwks_too_large_unreadable_or_redirected_is_not_used(keys: KeyServer, page: tuple[int, bytes]) -> None:
    keys.pages["/jwks"] = page
    signin = sign_in({"AUTH_MODE": "jwt", "AUTH_JWKS_URL": f"{keys.url}/jwks"})
    await signin.start()
    assert (await refused(signin, token=token(RSA_KEY, "RS256", "rsa-1"))).code is ErrorCode.UNAVAILABLE
    assert keys.requests == ["/jwks"]  # a redirect is not followed


# ---- alb mode -----------------------------------------------------------------------------------------------------


def alb_env(keys: KeyServer) -> dict[str, str]:
    return {"AUTH_MODE": "alb", "AUTH_ALB_ARN": ARN, "AUTH_ALB_KEYS_URL": f"{keys.url}/{{region}}/{{kid}}"}


def serve_alb_key(keys: KeyServer, kid: str, key: ec.EllipticCurvePrivateKey = EC_KEY) -> str:
    path = f"/eu-west-1/{kid}"
    keys.pages[path] = (200, pem(key))
    return path


async def test_the_albs_header_with_its_padding_signs_its_person_in(keys: KeyServer) -> None:
    kid = str(uuid.uuid4())
    path = serve_alb_key(keys, kid)
    data = alb_data(kid=kid)
    assert all("=" in segment for segment in data.split("."))  # padded, as the ALB sends it
    signin = sign_in({**alb_env(keys), "AUTH_NAME_CLAIM": "email"})
    person = await signin.identify(token=None, alb_data=data)
    assert person == SignedIn(name="ann@example.org", subject="23d498b2-3031-70d2-8a15-49dd886a087b", moderator=False)
    for _ in range(10):
        assert await signin.identify(token=None, alb_data=alb_data(kid=kid)) is not None
    assert keys.fetched(path) == 1


async def test_the_albs_header_stripped_of_its_padding_does_not_verify(keys: KeyServer) -> None:
    """The ALB signs the padded segments: the same header without its "=" is not what was signed."""
    kid = str(uuid.uuid4())
    serve_alb_key(keys, kid)
    header, payload, signature = alb_data(kid=kid).split(".")
    stripped = f"{header.rstrip('=')}.{payload.rstrip('=')}.{signature}"
    assert (await refused(sign_in(alb_env(keys)), alb_data=stripped)).code is ErrorCode.INVALID_TOKEN


async def test_a_header_forged_with_another_key_is_refused(keys: KeyServer) -> None:
    kid = str(uuid.uuid4())
    serve_alb_key(keys, kid)
    refusal = await refused(sign_in(alb_env(keys)), alb_data=alb_data(OTHER_EC_KEY, kid=kid))
    assert (refusal.code, refusal.detail) == (ErrorCode.INVALID_TOKEN, "That token's signature does not match.")


async def test_a_header_from_another_load_balancer_is_refused_without_a_fetch(keys: KeyServer) -> None:
    kid = str(uuid.uuid4())
    serve_alb_key(keys, kid)
    other = ARN.replace("123456789012", "210987654321")
    refusal = await refused(sign_in(alb_env(keys)), alb_data=alb_data(kid=kid, signer=other))
    assert refusal.code is ErrorCode.INVALID_TOKEN
    assert "another load balancer" in refusal.detail
    assert keys.requests == []


@pytest.mark.parametrize("kid", ["../../etc/passwd", "a/b", "%2e%2e", "kid?x=1", "", "g" * 10, "a" * 65, 42])
async def test_a_kid_that_is_not_a_key_id_is_never_fetched(keys: KeyServer, kid: Any) -> None:
    refusal = await refused(sign_in(alb_env(keys)), alb_data=alb_data(kid=kid))
    assert refusal.code is ErrorCode.INVALID_TOKEN
    assert keys.requests == []


async def test_an_expired_header_is_refused_without_a_fetch(keys: KeyServer) -> None:
    kid = str(uuid.uuid4())
    serve_alb_key(keys, kid)
    refusal = await refused(sign_in(alb_env(keys)), alb_data=alb_data(kid=kid, exp=time.time() - 120))
    assert "expired" in refusal.detail
    assert keys.requests == []
    # Signed, but the payload's own expiry has passed.
    old = alb_data(kid=kid, payload={"exp": int(time.time()) - 120})
    assert "expired" in (await refused(sign_in(alb_env(keys)), alb_data=old)).detail


async def test_a_header_naming_a_key_the_alb_does_not_have_is_refused(keys: KeyServer) -> None:
    refusal = await refused(sign_in(alb_env(keys)), alb_data=alb_data(kid=str(uuid.uuid4())))
    assert refusal.code is ErrorCode.INVALID_TOKEN
    assert len(keys.requests) == 1


async def test_headers_naming_new_keys_cost_a_bounded_number_of_fetches(keys: KeyServer) -> None:
    clock = Clock()
    signin = sign_in(alb_env(keys), clock)
    for _ in range(100):
        refusal = await refused(signin, alb_data=alb_data(kid=str(uuid.uuid4())))
        assert refusal.code in (ErrorCode.INVALID_TOKEN, ErrorCode.UNAVAILABLE)
    assert len(keys.requests) == ALB_FETCH_BURST
    clock.now += FETCH_INTERVAL
    kid = str(uuid.uuid4())
    serve_alb_key(keys, kid)
    assert await signin.identify(token=None, alb_data=alb_data(kid=kid)) is not None
    assert len(keys.requests) == ALB_FETCH_BURST + 1


async def test_a_socket_without_the_albs_header_is_told_to_sign_in(keys: KeyServer) -> None:
    signin = sign_in(alb_env(keys))
    for missing in (None, ""):
        assert (await refused(signin, alb_data=missing)).code is ErrorCode.SIGN_IN_REQUIRED
    # In alb mode a client's own token counts for nothing.
    assert (await refused(signin, token=token())).code is ErrorCode.SIGN_IN_REQUIRED


@pytest.mark.parametrize(
    "data",
    ["x", "a.b.c", "a==.b.c", "eyJhbGciOiJFUzI1NiJ9.e30.!!!!", "é.é.é", "a.b.c.d", "x" * 20_000],
)
async def test_a_garbled_alb_header_is_refused(keys: KeyServer, data: str) -> None:
    assert (await refused(sign_in(alb_env(keys)), alb_data=data)).code is ErrorCode.INVALID_TOKEN
    assert keys.requests == []


async def test_a_key_that_is_not_p256_is_not_used(keys: KeyServer) -> None:
    kid = str(uuid.uuid4())
    keys.pages[f"/eu-west-1/{kid}"] = (200, pem(RSA_KEY))
    assert (await refused(sign_in(alb_env(keys)), alb_data=alb_data(kid=kid))).code is ErrorCode.UNAVAILABLE


# ---- settings -----------------------------------------------------------------------------------------------------


def test_signing_in_is_off_by_default() -> None:
    settings = Settings.from_env({})
    assert settings.auth_mode == "names"
    assert settings.auth_name_claim == "name"
    assert settings.auth_leeway_seconds == 30
    assert settings.auth_alb_keys_url == "https://public-keys.auth.elb.{region}.amazonaws.com/{kid}"
    assert not settings.auth_jwt_secret


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"AUTH_MODE": "oauth"}, "AUTH_MODE"),
        ({"AUTH_MODE": "jwt"}, "AUTH_JWT_SECRET"),
        ({"AUTH_MODE": "jwt", "AUTH_JWT_SECRET": "short"}, "32 bytes"),
        ({"AUTH_MODE": "jwt", "AUTH_JWKS_FILE": "/k.json", "AUTH_JWKS_URL": "https://id.example.org/jwks"}, "not both"),
        ({"AUTH_MODE": "jwt", "AUTH_JWKS_URL": "http://id.example.org/jwks"}, "https"),
        ({"AUTH_MODE": "jwt", "AUTH_JWKS_URL": "file:///etc/jwks.json"}, "https"),
        ({"AUTH_MODE": "jwt", "AUTH_JWT_SECRET_FILE": "/nonexistent/secret"}, "AUTH_JWT_SECRET_FILE"),
        ({"AUTH_LEEWAY_SECONDS": "3600"}, "AUTH_LEEWAY_SECONDS"),
        ({"AUTH_MODERATOR_CLAIM": "groups"}, "AUTH_MODERATOR_VALUE"),
        ({"AUTH_MODE": "alb"}, "AUTH_ALB_ARN"),
        ({"AUTH_MODE": "alb", "AUTH_ALB_ARN": "arn:aws:iam::123456789012:role/chat"}, "AUTH_ALB_ARN"),
        ({"AUTH_MODE": "alb", "AUTH_ALB_ARN": ARN, "AUTH_ALB_REGION": "us-east-1"}, "region"),
        ({"AUTH_MODE": "alb", "AUTH_ALB_ARN": ARN, "AUTH_ALB_REGION": "eu-west-1/x"}, "AUTH_ALB_REGION"),
        ({"AUTH_MODE": "alb", "AUTH_ALB_ARN": ARN, "AUTH_ALB_KEYS_URL": "https://keys.example.org/"}, "{kid}"),
        ({"AUTH_MODE": "alb", "AUTH_ALB_ARN": ARN, "AUTH_ALB_KEYS_URL": "http://keys.example.org/{kid}"}, "https"),
    ],
)
def test_a_sign_in_setting_it_cannot_run_with_stops_the_replica(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace("{", r"\{").replace("}", r"\}")):
        Settings.from_env(env)


def test_the_settings_a_mode_needs_are_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    settings = Settings.from_env({"AUTH_MODE": "JWT", "AUTH_JWT_SECRET_FILE": str(secret), "AUTH_JWT_SECRET": "x"})
    assert (settings.auth_mode, settings.auth_jwt_secret.reveal()) == ("jwt", SECRET)  # the file wins
    assert SECRET not in repr(settings)
    local = Settings.from_env({"AUTH_MODE": "jwt", "AUTH_JWKS_URL": "http://127.0.0.1:8080/jwks"})
    assert local.auth_jwks_url == "http://127.0.0.1:8080/jwks"  # plain http to loopback only, for tests
    alb = Settings.from_env({"AUTH_MODE": "alb", "AUTH_ALB_ARN": ARN})
    assert alb.alb_region == "eu-west-1"
    assert alb.alb_keys_url_for("abc-123") == "https://public-keys.auth.elb.eu-west-1.amazonaws.com/abc-123"


def test_a_jwks_file_without_a_usable_key_stops_the_replica(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    for body in (b"not json", jwks({"kty": "oct", "k": "c2VjcmV0"}), b'{"keys": []}'):
        path.write_bytes(body)
        with pytest.raises(ConfigError, match="AUTH_JWKS_FILE"):
            sign_in({"AUTH_MODE": "jwt", "AUTH_JWKS_FILE": str(path)})
    with pytest.raises(ConfigError, match="cannot be read"):
        sign_in({"AUTH_MODE": "jwt", "AUTH_JWKS_FILE": str(tmp_path / "missing.json")})


# ---- nginx --------------------------------------------------------------------------------------------------------

NGINX = Path(__file__).resolve().parents[2] / "services" / "nginx"


def test_nginx_never_passes_on_a_clients_own_alb_sign_in_headers() -> None:
    """In Compose nginx is the front: a client could send x-amzn-oidc-data itself, so nginx must drop it (verified
    against a running nginx when this was written: the replica saw none of the three)."""
    headers = (NGINX / "proxy-headers.conf").read_text()
    for name in ("X-Amzn-Oidc-Data", "X-Amzn-Oidc-Accesstoken", "X-Amzn-Oidc-Identity"):
        assert re.search(rf'^proxy_set_header {name} "";$', headers, re.M | re.I), name
    conf = (NGINX / "nginx.conf").read_text()
    locations = re.findall(r"location [^{]*\{(.*?)\n        \}", conf, re.S)
    proxied = [body for body in locations if "proxy_pass" in body]
    assert proxied
    assert all("include /etc/nginx/proxy-headers.conf;" in body for body in proxied)
