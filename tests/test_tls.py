"""TLS (issue 8): --tls-cert/--tls-key serve HTTPS with the ssl module, TLS 1.2 at least.

The suite's own seed upload tests (imported from test_api.py, so they are the very same
functions) run here against a server with a self-signed certificate made by `openssl` in the
test, through a requests session that trusts exactly that certificate. Plain HTTP on the
HTTPS port gets no HTTP answer: the two are never mixed on one port.
"""
from __future__ import annotations

import shutil
import socket
import ssl
import subprocess

import pytest
import requests

from conftest import need
from test_api import (  # noqa: F401  (collected here: the same tests, over HTTPS)
    test_assembled_file_is_served_with_ranges_and_its_status_url,
    test_first_chunk_answers_the_seed_success_envelope,
    test_last_chunk_answers_status_completed,
    test_shuffled_chunks_sent_twice_assemble_once,
    test_webm_in_order_grows_while_uploading_and_assembles_byte_exact,
)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    need(shutil.which("openssl"), "the openssl command makes the test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
def server(server_factory, certificate):
    cert, key = certificate
    srv = server_factory(args=["--tls-cert", cert, "--tls-key", key])
    assert srv.url.startswith("https://")
    return srv


@pytest.fixture
def session(certificate):
    with requests.Session() as s:
        s.trust_env = False              # else REQUESTS_CA_BUNDLE would win over s.verify
        s.verify = certificate[0]
        yield s


def test_https_uses_tls_1_2_or_later_and_plain_http_gets_no_http_answer(server, certificate):
    context = ssl.create_default_context(cafile=certificate[0])
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                more = tls.recv(4096)
                assert more, head
                head += more
            assert head.startswith(b"HTTP/1.1 200")
            assert b"\r\nStrict-Transport-Security: max-age=" in head
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            reply = raw.recv(64)
        except ConnectionResetError:
            reply = b""
        assert not reply.startswith(b"HTTP/")
    with requests.Session() as again:
        again.trust_env = False
        assert again.get(server.url + "/healthz", verify=certificate[0],
                         timeout=10).status_code == 200     # still serving after that


def test_tls_needs_both_files(server_factory, certificate):
    with pytest.raises(RuntimeError):
        server_factory(args=["--tls-cert", certificate[0]])


def test_events_over_https_websocket_and_sse(server, session, certificate, sample_webm):
    from websockets.sync.client import connect as ws_connect

    from conftest import send_chunk
    assert send_chunk(session, server.url, "tls_events", 0, sample_webm[:4096]).status_code \
        == 200
    context = ssl.create_default_context(cafile=certificate[0])
    url = server.url.replace("https://", "wss://") + "/api/video/events/tls_events"
    with ws_connect(url, ssl=context, open_timeout=10) as ws:
        assert b"tls_events" in ws.recv(timeout=10).encode()
        assert send_chunk(session, server.url, "tls_events", 1, b"x" * 1000).status_code == 200
        while True:                            # the chunk event arrives over TLS as well
            if '"chunk"' in ws.recv(timeout=10).replace(" ", ""):
                break
        ws.ping().wait(10)
    with session.get(server.url + "/api/video/events/tls_events", stream=True,
                     timeout=10) as sse:
        assert sse.status_code == 200
        line = b""
        while not line.startswith(b"data:"):
            line = sse.raw.readline()
            assert line, "SSE stream ended"
