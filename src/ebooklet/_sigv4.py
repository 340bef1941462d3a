"""Request signing: AWS Signature Version 4 for S3, and the credential chain.

:class:`Signer` makes the headers botocore's ``S3SigV4Auth`` makes (the payload is
hashed; tests compare the two), without its per-request objects, and derives the
day's signing key once. It holds no secret: only a digest of it, to notice new
credentials. It knows nothing of connections, pools or retries.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any
from urllib.parse import urlsplit

from .errors import AuthError

UNSIGNED_HEADERS = frozenset({
    "baggage", "connection", "expect", "keep-alive", "proxy-authenticate",
    "proxy-authorization", "te", "traceparent", "tracestate", "trailer",
    "transfer-encoding", "upgrade", "user-agent", "x-amzn-trace-id",
})
"""Headers SigV4 signatures leave out (botocore's ``SIGNED_HEADERS_BLACKLIST``)."""
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class Signer:
    """Signs requests to S3 in one region.

    Args:
        region: the region named in the credential scope.
    """

    def __init__(self, region: str):
        self.region = region
        # (day, sha256 of the secret, signing key): never the secret itself, see signing_key
        self._day_key: tuple[str, bytes, bytes] | None = None

    def sign(self, credentials: Any, method: str, url: str, headers: dict, body: Any) -> dict:
        """``headers`` plus the SigV4 headers of the request.

        Args:
            credentials: botocore credentials; those about to expire are refreshed first
                (botocore's ``get_frozen_credentials``).
            method, url, headers, body: the request; a stream body is hashed and rewound.
        """
        frozen = credentials.get_frozen_credentials()
        now = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        signed = dict(headers)
        signed["X-Amz-Date"] = now
        if frozen.token:
            signed["X-Amz-Security-Token"] = frozen.token
        signed["X-Amz-Content-SHA256"] = payload_sha256(body)
        parts = urlsplit(url)
        canonical = {"host": host_header(parts)}
        for name, value in signed.items():
            if name.lower() not in UNSIGNED_HEADERS:
                canonical[name.lower()] = " ".join(value.split())
        names = sorted(canonical)
        signed_names = ";".join(names)
        request = "\n".join((
            method,
            parts.path,
            canonical_query(parts.query),
            "".join(f"{n}:{canonical[n]}\n" for n in names),
            signed_names,
            signed["X-Amz-Content-SHA256"],
        ))
        scope = f"{now[:8]}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{now}\n{scope}\n{hashlib.sha256(request.encode()).hexdigest()}"
        key = self.signing_key(now[:8], frozen.secret_key)
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        signed["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={frozen.access_key}/{scope}, "
            f"SignedHeaders={signed_names}, Signature={signature}"
        )
        return signed

    def signing_key(self, day: str, secret: str) -> bytes:
        """The SigV4 key of ``day`` (``YYYYMMDD``), derived once a day (and again if the
        credentials change).

        The cache keeps a SHA-256 digest of the secret, to notice new credentials,
        never the secret itself: ``vars()`` of a connection must not show it.
        """
        digest = hashlib.sha256(secret.encode()).digest()
        cached = self._day_key
        if cached is None or cached[:2] != (day, digest):
            key = f"AWS4{secret}".encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            cached = self._day_key = (day, digest, key)
        return cached[2]


def payload_sha256(body: Any) -> str:
    """The hex SHA-256 of a request body: bytes-like, or a seekable stream (read, then
    rewound to where it was)."""
    if not body:
        return _EMPTY_SHA256
    if not hasattr(body, "read"):
        return hashlib.sha256(body).hexdigest()
    hasher = hashlib.sha256()
    position = body.tell()
    while chunk := body.read(1 << 20):
        hasher.update(chunk)
    body.seek(position)
    return hasher.hexdigest()


def canonical_query(query: str) -> str:
    """SigV4's canonical form of a URL's (already encoded) query: its pairs sorted."""
    pairs = sorted(pair.partition("=")[::2] for pair in query.split("&")) if query else []
    return "&".join(f"{name}={value}" for name, value in pairs)


def host_header(parts: Any) -> str:
    """The ``Host`` header of a split URL as SigV4 signs it (no default port)."""
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != {"http": 80, "https": 443}.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


def default_credentials(profile: str | None = None) -> Any:
    """The credentials of boto3's chain (environment, config files, SSO, roles...), which
    refresh themselves; ``profile`` names the config profile to use (``None``: the default).

    Raises:
        AuthError: the chain found none.
    """
    import boto3
    import botocore.exceptions

    try:
        credentials = boto3.Session(profile_name=profile).get_credentials()
    except botocore.exceptions.ProfileNotFound:
        raise AuthError(
            f"The AWS config profile {profile!r} does not exist here; create it "
            "(aws configure --profile) or give another."
        ) from None
    if credentials is None:
        raise AuthError(
            "No credentials given and none found in the environment or AWS config; "
            "pass access_key_id and access_key to S3Connection."
        )
    return credentials
