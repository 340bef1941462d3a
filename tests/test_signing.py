"""S3Connection signs requests exactly as botocore's SigV4 signer would.

The connection computes SigV4 itself (botocore's per-request objects cost more than
a small GET); these tests sign a spread of requests both ways, at the same instant.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

import ebooklet
from ebooklet._sigv4 import Signer


def botocore_headers(conn: Any, method: str, url: str, headers: dict, body: Any, now: str) -> dict:
    """What ``S3SigV4Auth.add_auth`` makes of the request, with its clock at ``now``."""
    request = AWSRequest(method=method, url=url, headers=headers, data=body or b"")
    request.context["timestamp"] = now
    auth = S3SigV4Auth(conn._credentials, "s3", conn.region)
    auth._modify_request_before_signing(request)
    string_to_sign = auth.string_to_sign(request, auth.canonical_request(request))
    auth._inject_signature_to_request(request, auth.signature(string_to_sign, request))
    return dict(request.headers.items())


CONNECTIONS = {
    "local endpoint": dict(endpoint_url="http://127.0.0.1:9000"),
    "default port": dict(endpoint_url="http://LocalHost:80"),
    "aws": dict(region="eu-west-1"),
    "odd key": dict(endpoint_url="https://example.com:8443", db_key="a dir/db+ü~x=1"),
}


def requests(conn: Any) -> list[tuple[str, str, dict, Any]]:
    """``(method, url, headers, body)`` of every kind the connection sends."""
    md5 = "1B2M2Y8AsgTpgAZ7PuB5fA=="
    return [
        ("GET", conn._url(".ebk/pack/00ff"), {"Range": "bytes=0-1023"}, None),
        ("GET", conn._url(""), {"If-None-Match": '"abc"'}, None),
        ("GET", conn._url(".ebk/pack/00ff"), {"Range": "bytes=-65536"}, None),
        ("PUT", conn._url(""), {"Content-MD5": md5, "Content-Type": "application/json",
                                "If-Match": '"etag"'}, b'{"a": 1}'),
        ("PUT", conn._url(".ebk/lock"), {"Content-MD5": md5, "If-None-Match": "*"}, b"x" * 5000),
        ("PUT", conn._url(".ebk/pack/01", {"partNumber": "2", "uploadId": "a/b+c=="}),
         {"Content-MD5": md5}, memoryview(b"part bytes")),
        ("PUT", conn._url(".ebk/pack/02"), {"Content-MD5": md5, "Content-Length": "8991"},
         io.BytesIO(b"streamed " * 999)),
        ("POST", conn._url(".ebk/pack/01", {"uploads": ""}), {}, None),
        ("DELETE", conn._url(".ebk/lock"), {"If-Match": '"etag"'}, None),
        ("PUT", conn._url(".ebk/pack/03"), {"x-amz-copy-source": conn.copy_source(".ebk/pack/01"),
                                            "x-amz-copy-source-range": "bytes=0-9"}, None),
        ("GET", conn._bucket_url({"list-type": "2", "prefix": conn.db_key + ".ebk/ü x",
                                  "continuation-token": "1/2+3=="}), {}, None),
        ("POST", conn._bucket_url({"delete": ""}), {"Content-MD5": md5,
                                                   "Content-Type": "application/xml"}, b"<Delete/>"),
        ("GET", conn._url(".ebk/x") + "?versionId=3&uploads&acl=", {"Range": " bytes=1-2 "}, None),
    ]


@pytest.mark.parametrize("where", CONNECTIONS.values(), ids=CONNECTIONS.keys())
@pytest.mark.parametrize("token", [None, "session-token"])
def test_signature_matches_botocore(where: dict, token: str | None) -> None:
    params = dict(db_key="bench/db", bucket="my-bucket") | where
    conn = ebooklet.S3Connection(
        "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", session_token=token, **params
    )
    for method, url, headers, body in requests(conn):
        ours = conn._sign(method, url, headers, body)
        theirs = botocore_headers(conn, method, url, headers, body, ours["X-Amz-Date"])
        assert ours == theirs, (method, url)
        if hasattr(body, "tell"):
            assert body.tell() == 0  # rewound after hashing


def test_signing_key_is_derived_once_a_day() -> None:
    signer = Signer("us-east-1")
    first = signer.signing_key("20260101", "secret")
    assert signer.signing_key("20260101", "secret") is first
    second = signer.signing_key("20260102", "secret")
    assert second != first
    assert signer.signing_key("20260102", "another secret") != second
