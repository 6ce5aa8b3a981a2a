"""AWS Signature Version 4 in s3client.py against published test vectors (no server needed).

- tests/data/sigv4/aws-c-auth/: signed requests of the AWS SigV4 test suite as shipped by
  awslabs/aws-c-auth (Apache-2.0), service "service"; see tests/data/sigv4/README.md.
- tests/data/sigv4/s3-docs-examples.json: the S3 examples of the AWS documentation (header
  auth with signed payloads, and a presigned URL), which also check S3's own rules: the path is
  encoded once and never normalised, and x-amz-content-sha256 is signed.
"""
from __future__ import annotations

import hashlib
import json
import os

import pytest

import s3client

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sigv4")
SUITE = os.path.join(DATA, "aws-c-auth")
SUITE_CONTEXT = {"access_key": "AKIDEXAMPLE",
                 "secret_key": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                 "region": "us-east-1", "service": "service", "amz_date": "20150830T123600Z"}


def suite_cases():
    return sorted(name for name in os.listdir(SUITE) if os.path.isdir(os.path.join(SUITE, name)))


def parse_signed_request(text):
    """(method, raw path, raw query, [(name, value)], body) of a header-signed-request.txt.
    The suite writes a header with several values as one line per value, the later ones
    indented (get-header-value-multiline); they sign as the values of a repeated header."""
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    # the target may hold a space (get-space): the protocol is the last word
    method, rest = lines[0].split(" ", 1)
    target = rest.rsplit(" ", 1)[0]
    headers = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:
            headers.append((headers[-1][0], line))
        else:
            name, _, value = line.partition(":")
            headers.append((name, value))
    path, _, query = target.partition("?")
    return method, path, query, headers, body


@pytest.mark.parametrize("case", suite_cases())
def test_aws_sigv4_suite_authorization_header(case):
    with open(os.path.join(SUITE, case, "header-signed-request.txt"), encoding="utf-8") as f:
        method, path, query, headers, body = parse_signed_request(f.read())
    expected = [value for name, value in headers if name.lower() == "authorization"][0]
    headers = [(name, value) for name, value in headers if name.lower() != "authorization"]
    signed_names = expected.split("SignedHeaders=")[1].split(",")[0].split(";")
    lengths = [int(v) for n, v in headers if n.lower() == "content-length"]
    body = body.encode("utf-8")[:lengths[0]] if lengths else b""
    declared = [v for n, v in headers if n.lower() == "x-amz-content-sha256"]
    payload_hash = declared[0] if declared and "x-amz-content-sha256" in signed_names else \
        hashlib.sha256(body).hexdigest()
    ctx = SUITE_CONTEXT
    signed = s3client.sign(method, path, s3client.parse_query(query), headers, payload_hash,
                           ctx["access_key"], ctx["secret_key"], ctx["region"], ctx["service"],
                           ctx["amz_date"], signed_names=signed_names,
                           normalize=not case.endswith("-unnormalized"))
    assert signed["authorization"] == expected, signed["canonical_request"]


def load_s3_examples():
    with open(os.path.join(DATA, "s3-docs-examples.json"), encoding="utf-8") as f:
        return json.load(f)


S3_EXAMPLES = load_s3_examples()


@pytest.mark.parametrize("example", S3_EXAMPLES["header_examples"], ids=lambda e: e["name"])
def test_s3_documentation_examples_sign_like_aws(example):
    ex = S3_EXAMPLES
    body = example["body"].encode("utf-8")
    payload_hash = hashlib.sha256(body).hexdigest()
    headers = [("Host", ex["host"]), ("x-amz-date", ex["amz_date"]),
               ("x-amz-content-sha256", payload_hash)] + [tuple(h) for h in example["headers"]]
    path = "/" + (example["key"] or "")
    signed = s3client.sign(example["method"], path, [tuple(q) for q in example["query"]],
                           headers, payload_hash, ex["access_key"], ex["secret_key"],
                           ex["region"], ex["service"], ex["amz_date"])
    assert signed["signed_headers"] == example["signed_headers"]
    assert signed["signature"] == example["signature"], signed["canonical_request"]


@pytest.mark.parametrize("example", S3_EXAMPLES["presign_examples"], ids=lambda e: e["name"])
def test_presigned_url_matches_the_documentation(example):
    ex = S3_EXAMPLES
    client = s3client.S3Client(
        "examplebucket", endpoint="https://s3.amazonaws.com", region=ex["region"],
        addressing="virtual",
        credentials=s3client.Credentials(ex["access_key"], ex["secret_key"]))
    url = client.presigned_url(example["key"], expires=example["expires"], now=ex["amz_date"])
    assert url == example["url"]


def test_client_signs_like_the_documentation_through_its_own_request_path():
    """The client's request path (headers it adds, virtual-host addressing, payload hashing)
    gives the documented signature when its clock says the documented date."""
    ex = S3_EXAMPLES
    example = S3_EXAMPLES["header_examples"][0]          # GET test.txt with a Range
    client = s3client.S3Client(
        "examplebucket", endpoint="https://s3.amazonaws.com", region=ex["region"],
        addressing="virtual",
        credentials=s3client.Credentials(ex["access_key"], ex["secret_key"]))
    assert client.host_header == ex["host"]
    path = client._path(example["key"])
    headers = [("Host", client.host_header), ("X-Amz-Date", ex["amz_date"]),
               ("X-Amz-Content-SHA256", s3client.EMPTY_SHA256), ("Range", "bytes=0-9")]
    signed = s3client.sign("GET", path, [], headers, s3client.EMPTY_SHA256, ex["access_key"],
                           ex["secret_key"], ex["region"], "s3", ex["amz_date"])
    assert signed["signature"] == example["signature"]


def test_s3_paths_are_never_normalised_and_encoded_once():
    assert s3client.canonical_uri("/bucket/a//b/./c/../d") == "/bucket/a//b/./c/../d"
    assert s3client.canonical_uri("/bucket/x y+z$") == "/bucket/x%20y%2Bz%24"
    assert s3client.canonical_uri("/b/\u00e9") == "/b/%C3%A9"
    assert s3client.canonical_uri("/b/a%20b") == "/b/a%2520b"     # a literal % in a key


def test_canonical_query_sorts_and_encodes():
    assert s3client.canonical_query([("prefix", "a b/"), ("list-type", "2"),
                                     ("uploads", "")]) == \
        "list-type=2&prefix=a%20b%2F&uploads="


def test_session_token_is_signed_in_headers_and_presigned_urls():
    credentials = s3client.Credentials("AKID", "secret", "token+/=")
    client = s3client.S3Client("bucket", endpoint="http://127.0.0.1:9", credentials=credentials)
    url = client.presigned_url("k", expires=60, now="20240101T000000Z")
    assert "X-Amz-Security-Token=token%2B%2F%3D" in url
    assert repr(credentials).count("secret") == 1 and "secret'" not in repr(credentials)


@pytest.mark.parametrize("expires", [0, 7 * 86400 + 1])
def test_presign_refuses_lifetimes_aws_refuses(expires):
    client = s3client.S3Client("bucket", endpoint="http://127.0.0.1:9",
                               credentials=s3client.Credentials("AKID", "secret"))
    with pytest.raises(s3client.S3ConfigError):
        client.presigned_url("k", expires=expires)


@pytest.mark.parametrize("url,bucket,prefix", [
    ("s3://videos", "videos", ""), ("s3://videos/", "videos", ""),
    ("s3://videos/m1/prod", "videos", "m1/prod"), ("s3://my.bucket-1/x/", "my.bucket-1", "x"),
])
def test_storage_urls_are_split_into_bucket_and_prefix(url, bucket, prefix):
    assert s3client.split_storage_url(url) == (bucket, prefix)


@pytest.mark.parametrize("url", ["videos", "s3:/videos", "s3://", "s3://Videos",
                                 "s3://v/a//b", "s3://v/../x", "http://v/x"])
def test_bad_storage_urls_are_refused(url):
    with pytest.raises(s3client.S3ConfigError):
        s3client.split_storage_url(url)


def test_missing_credentials_are_a_config_error():
    with pytest.raises(s3client.S3ConfigError):
        s3client.Credentials.from_environ({})
