"""tus 1.0 at /files/: every header and status code of the core protocol and its extensions,
at and past each edge, against a real server process.

Protocol text: https://tus.io/protocols/resumable-upload (1.0.x). The tests read as the
exchanges the protocol describes; where the protocol leaves a choice, the test names the one
tus.py's docstring documents.
"""
from __future__ import annotations

import email.utils
import hashlib
import time

import pytest
import requests

import _tus
from _tus import OFFSET_TYPE, TUS, create, head, location, metadata, new_upload, patch
from conftest import ServerProcess, get_status, send_chunk, stopping, wait_until

PIECE = 16 << 10           # the shared server stores PATCHes in 16 KiB pieces


@pytest.fixture(scope="module")
def tus_server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("tus"),
                        args=["--tus-piece-size", str(PIECE), "--max-upload-size", "8M"])
    with stopping(srv):
        srv.start()
        yield srv


@pytest.fixture
def base(tus_server):
    return tus_server.url


@pytest.fixture
def s():
    with requests.Session() as session:
        yield session


def finished_upload(s, base, data, meta=None):
    path = new_upload(s, base, len(data), meta=meta)
    response = patch(s, base, path, 0, data)
    assert response.status_code == 204, response.text
    return path


# ---------------------------------------------------------------------------------------------
# OPTIONS, versions, Tus-Resumable everywhere, CORS, method override
# ---------------------------------------------------------------------------------------------

def test_options_advertises_version_extensions_max_size_and_checksums(s, base):
    for headers in ({}, {"Tus-Resumable": "0.0.1"}):       # OPTIONS ignores the version
        response = s.options(base + "/files/", headers=headers)
        assert response.status_code == 204
        assert response.headers["Tus-Resumable"] == "1.0.0"
        assert response.headers["Tus-Version"] == "1.0.0"
        extensions = response.headers["Tus-Extension"].split(",")
        assert set(extensions) >= {"creation", "creation-with-upload", "creation-defer-length",
                                   "termination", "checksum", "expiration", "concatenation"}
        assert response.headers["Tus-Max-Size"] == str(8 << 20)
        algorithms = response.headers["Tus-Checksum-Algorithm"].split(",")
        assert {"sha1", "md5", "sha256", "crc32"} <= set(algorithms)
    upload = new_upload(s, base, 10)
    assert s.options(base + upload).headers["Tus-Version"] == "1.0.0"


def test_options_is_a_cors_preflight_for_tus_requests(s, base):
    response = s.options(base + "/files/", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "tus-resumable,upload-offset,content-type"})
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    methods = response.headers["Access-Control-Allow-Methods"]
    for method in ("POST", "HEAD", "PATCH", "DELETE"):
        assert method in methods
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    for name in ("tus-resumable", "upload-offset", "upload-length", "upload-metadata",
                 "upload-defer-length", "upload-concat", "upload-checksum",
                 "x-http-method-override", "content-type"):
        assert name in allowed


def test_cors_responses_expose_offset_location_length_and_tus_headers(s, base):
    origin = {"Origin": "http://app.example"}
    created = create(s, base, 100, headers=origin)
    expose = [h.strip().lower() for h in
              created.headers["Access-Control-Expose-Headers"].split(",")]
    for name in ("upload-offset", "location", "upload-length", "tus-resumable",
                 "tus-version", "tus-extension", "tus-max-size", "upload-expires",
                 "upload-metadata", "upload-concat", "upload-defer-length"):
        assert name in expose
    assert created.headers["Access-Control-Allow-Origin"] == "*"
    answer = head(s, base, location(created), headers=origin)
    assert "upload-offset" in answer.headers["Access-Control-Expose-Headers"].lower()


@pytest.mark.parametrize("version", [None, "0.2.2", "1.0", "2.0.0", ""])
def test_unsupported_or_missing_version_is_412_with_tus_version_and_not_processed(
        s, base, sample_webm, version):
    upload = new_upload(s, base, 100)
    headers = {} if version is None else {"Tus-Resumable": version}
    refused = [
        s.post(base + "/files/", headers=dict(headers, **{"Upload-Length": "5"})),
        s.head(base + upload, headers=headers),
        s.patch(base + upload, data=sample_webm[:10], headers=dict(headers, **{
            "Upload-Offset": "0", "Content-Type": OFFSET_TYPE})),
        s.delete(base + upload, headers=headers),
    ]
    for response in refused:
        assert response.status_code == 412
        assert response.headers["Tus-Version"] == "1.0.0"
        assert response.headers["Tus-Resumable"] == "1.0.0"
        assert "Location" not in response.headers
    assert _tus.offset_of(s, base, upload) == 0            # nothing was processed


def test_every_answer_carries_tus_resumable(s, base, sample_webm):
    upload = new_upload(s, base, 100)
    answers = [
        create(s, base, 100),                                      # 201
        head(s, base, upload),                                     # 200
        patch(s, base, upload, 0, sample_webm[:10]),               # 204
        patch(s, base, upload, 0, b"x"),                           # 409
        patch(s, base, upload, 10, b"x", {"Content-Type": "text/plain"}),   # 415
        patch(s, base, upload, 10, b"x", {"Upload-Checksum": _tus.checksum("sha1", b"y")}),
        head(s, base, "/files/no_such_upload"),                    # 404
        s.get(base + upload, headers=TUS),                         # 405
        create(s, base),                                           # 400
        create(s, base, 1 << 40),                                  # 413
        s.delete(base + upload, headers=TUS),                      # 204
    ]
    assert [a.status_code for a in answers] == [201, 200, 204, 409, 415, 460, 404, 405, 400,
                                                413, 204]
    for answer in answers:
        assert answer.headers.get("Tus-Resumable") == "1.0.0", answer.status_code


def test_other_methods_are_405_with_allow(s, base):
    upload = new_upload(s, base, 100)
    for method, path in (("GET", upload), ("PUT", upload), ("GET", "/files/"),
                         ("PATCH", "/files/"), ("DELETE", "/files/")):
        response = s.request(method, base + path, headers=TUS)
        assert response.status_code == 405, (method, path)
        assert "Allow" in response.headers
        assert response.headers["Tus-Resumable"] == "1.0.0"


def test_x_http_method_override_is_the_method(s, base, sample_webm):
    """A client behind a proxy that only passes POST (tus-js-client overridePatchMethod)."""
    data = sample_webm[:5000]
    upload = new_upload(s, base, len(data))
    first = patch(s, base, upload, 0, data[:3000], method="POST",
                  headers={"X-HTTP-Method-Override": "PATCH"})
    assert first.status_code == 204
    assert first.headers["Upload-Offset"] == "3000"
    looked = s.post(base + upload, headers=dict(TUS, **{"X-HTTP-Method-Override": "HEAD"}))
    assert looked.status_code == 200 and looked.headers["Upload-Offset"] == "3000"
    second = patch(s, base, upload, 3000, data[3000:], method="POST",
                   headers={"X-HTTP-Method-Override": "patch"})
    assert second.status_code == 204 and second.headers["Upload-Offset"] == "5000"
    gone = s.post(base + upload, headers=dict(TUS, **{"X-HTTP-Method-Override": "DELETE"}))
    assert gone.status_code == 204
    assert head(s, base, upload).status_code == 404


# ---------------------------------------------------------------------------------------------
# Creation and HEAD
# ---------------------------------------------------------------------------------------------

def test_creation_is_201_with_location_and_expiry_and_head_reports_it(s, base):
    meta = metadata(filename="clip.webm", filetype="video/webm", note=None)
    created = create(s, base, 1234, meta=meta)
    assert created.status_code == 201
    path = location(created)
    assert path.startswith("/files/")
    assert "Upload-Offset" not in created.headers          # no body was sent
    expires = email.utils.parsedate_to_datetime(created.headers["Upload-Expires"])
    assert expires.timestamp() > time.time() + 3600        # default: a day
    answer = head(s, base, path)
    assert answer.status_code == 200
    assert answer.headers["Upload-Offset"] == "0"
    assert answer.headers["Upload-Length"] == "1234"
    assert answer.headers["Upload-Metadata"] == meta
    assert answer.headers["Cache-Control"] == "no-store"
    assert "Upload-Defer-Length" not in answer.headers
    assert "Upload-Concat" not in answer.headers
    assert "Upload-Expires" in answer.headers
    assert answer.content == b""


@pytest.mark.parametrize("headers,code", [
    ({}, "missing_length"),
    ({"Upload-Length": "10", "Upload-Defer-Length": "1"}, "missing_length"),
    ({"Upload-Defer-Length": "0"}, "invalid_defer_length"),
    ({"Upload-Defer-Length": "yes"}, "invalid_defer_length"),
    ({"Upload-Length": "-1"}, "invalid_upload_length"),
    ({"Upload-Length": "ten"}, "invalid_upload_length"),
    ({"Upload-Length": "10", "Upload-Concat": "sideways"}, "invalid_concat"),
])
def test_creation_needs_exactly_one_valid_length(s, base, headers, code):
    response = s.post(base + "/files/", headers=dict(TUS, **headers))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code


def test_creation_at_and_past_tus_max_size(s, base):
    limit = 8 << 20
    assert create(s, base, limit).status_code == 201
    refused = create(s, base, limit + 1)
    assert refused.status_code == 413
    assert refused.json()["error"]["code"] == "upload_too_large"


def test_head_and_patch_of_an_unknown_upload_are_404(s, base):
    for path in ("/files/tus_unknown", "/files/not%20an%20id", "/files/tus_unknown/more"):
        assert head(s, base, path).status_code == 404
        response = patch(s, base, path, 0, b"data")
        assert response.status_code == 404
        assert "Upload-Offset" not in response.headers
        assert response.headers["Tus-Resumable"] == "1.0.0"


def test_metadata_file_id_names_the_upload_in_the_seed_world(s, base, sample_webm):
    file_id = "rec_tus_%d" % time.monotonic_ns()
    path = finished_upload(s, base, sample_webm,
                           metadata(fileId=file_id, filename="a.webm", filetype="video/webm"))
    assert path == "/files/" + file_id
    status = get_status(s, base, file_id).json()["data"]
    assert status["state"] == "completed"
    assert status["fileSize"] == len(sample_webm)
    assert status["url"] == "/uploads/%s.webm" % file_id
    assert status["tus"] == {"uploadUrl": path, "uploadLength": len(sample_webm),
                             "filename": "a.webm"}
    assert _tus.video_bytes(s, base, file_id) == sample_webm
    wait_until(lambda: get_status(s, base, file_id).json()["data"]["sha256"],
               message="sha256")
    assert get_status(s, base, file_id).json()["data"]["sha256"] == \
        hashlib.sha256(sample_webm).hexdigest()
    taken = create(s, base, 10, meta=metadata(fileId=file_id))
    assert taken.status_code == 409
    assert taken.json()["error"]["code"] == "file_id_taken"


def test_a_seed_api_file_id_is_taken_for_tus_too(s, base, sample_webm):
    file_id = "seed_%d" % time.monotonic_ns()
    assert send_chunk(s, base, file_id, 0, sample_webm[:1000]).status_code == 200
    assert create(s, base, 10, meta=metadata(fileId=file_id)).status_code == 409


@pytest.mark.parametrize("meta,status,code", [
    (metadata(fileId="has space"), 400, "invalid_file_id"),
    (metadata(fileId="x" * 129), 400, "invalid_file_id"),
    (metadata(filetype="application/pdf"), 415, "unsupported_media_type"),
    (metadata(filetype="not a type"), 400, "invalid_mime_type"),
    ("filename !!!!", 400, "invalid_metadata"),                 # not base64
    ("filename YQ=", 400, "invalid_metadata"),                  # bad padding
    ("filename YQ==,filename Yg==", 400, "invalid_metadata"),   # duplicate key
    ("a YQ==,,b YQ==", 400, "invalid_metadata"),                # empty key
    ("fi le YQ==", 400, "invalid_metadata"),                     # space in the key
])
def test_bad_metadata_is_refused(s, base, meta, status, code):
    response = create(s, base, 10, meta=meta)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_filetype_or_filename_picks_the_extension(s, base, sample_mp4):
    by_type = finished_upload(s, base, sample_mp4, metadata(filetype="video/mp4"))
    by_name = finished_upload(s, base, sample_mp4, metadata(filename="phone.MP4"))
    for path in (by_type, by_name):
        file_id = _tus.upload_id(path)
        assert get_status(s, base, file_id).json()["data"]["url"].endswith(".mp4")
        assert _tus.video_bytes(s, base, file_id, "mp4") == sample_mp4
    empty = finished_upload(s, base, b"\x1a\x45\xdf\xa3" + b"\0" * 60, "")
    assert get_status(s, base, _tus.upload_id(empty)).json()["data"]["url"].endswith(".webm")


def test_metadata_at_and_past_its_limit(server_factory):
    srv = server_factory(args=["--tus-max-metadata", "64"])
    with requests.Session() as s:
        meta = metadata(filename="a" * 30)
        meta += "," + "k" * (64 - len(meta) - 1)
        assert len(meta) == 64
        assert create(s, srv.url, 10, meta=meta).status_code == 201
        refused = create(s, srv.url, 10, meta=meta + "k")
        assert refused.status_code == 431
        assert refused.json()["error"]["code"] == "metadata_too_large"


def test_empty_metadata_header_means_none(s, base):
    """tuspy sends `Upload-Metadata:` with nothing after it when there is no metadata."""
    path = new_upload(s, base, 10, meta="")
    assert "Upload-Metadata" not in head(s, base, path).headers


# ---------------------------------------------------------------------------------------------
# PATCH
# ---------------------------------------------------------------------------------------------

def test_patches_in_order_assemble_a_byte_exact_video(s, base, sample_webm, tus_server):
    path = new_upload(s, base, len(sample_webm), meta=metadata(filetype="video/webm"))
    offset = 0
    for size in (7, 16 << 10, (16 << 10) + 1, 50000, 1):
        response = patch(s, base, path, offset, sample_webm[offset:offset + size])
        assert response.status_code == 204
        offset += size
        assert response.headers["Upload-Offset"] == str(offset)
        assert "Upload-Expires" in response.headers
        assert response.content == b""
    last = patch(s, base, path, offset, sample_webm[offset:])
    assert last.status_code == 204
    assert last.headers["Upload-Offset"] == str(len(sample_webm))
    assert "Upload-Expires" not in last.headers              # finished: it will not expire
    file_id = _tus.upload_id(path)
    assert _tus.video_bytes(s, base, file_id) == sample_webm
    assert tus_server.storage.media(file_id) == sample_webm
    data = get_status(s, base, file_id).json()["data"]
    assert data["state"] == "completed"
    # One chunk per PATCH, and a PATCH longer than a piece became several chunks.
    assert data["chunksReceived"] >= 7
    answer = head(s, base, path)
    assert answer.headers["Upload-Offset"] == answer.headers["Upload-Length"]
    empty = patch(s, base, path, len(sample_webm), b"")
    assert empty.status_code == 204


@pytest.mark.parametrize("claimed", [0, 999, 1001, 5000])
def test_offset_mismatch_is_409_and_changes_nothing(s, base, sample_webm, claimed, tus_server):
    path = new_upload(s, base, 5000)
    assert patch(s, base, path, 0, sample_webm[:1000]).status_code == 204
    response = patch(s, base, path, claimed, sample_webm[claimed:claimed + 10])
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "offset_mismatch"
    assert _tus.offset_of(s, base, path) == 1000
    assert tus_server.storage.received(_tus.upload_id(path)) == sample_webm[:1000]


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "text/plain",
                                          "application/offset+octet-streams"])
def test_patch_with_another_content_type_is_415(s, base, sample_webm, content_type):
    path = new_upload(s, base, 100)
    headers = {"Content-Type": content_type} if content_type else {}
    sent = dict(TUS, **{"Upload-Offset": "0"})
    sent.update(headers)
    response = s.patch(base + path, data=sample_webm[:10], headers=sent)
    assert response.status_code == 415
    assert _tus.offset_of(s, base, path) == 0
    parameters = patch(s, base, path, 0, sample_webm[:10],
                       {"Content-Type": "Application/Offset+Octet-Stream; x=1"})
    assert parameters.status_code == 204


@pytest.mark.parametrize("offset_header", [None, "", "-1", "1.5", "abc"])
def test_patch_needs_a_valid_upload_offset(s, base, offset_header):
    path = new_upload(s, base, 100)
    headers = dict(TUS, **{"Content-Type": OFFSET_TYPE})
    if offset_header is not None:
        headers["Upload-Offset"] = offset_header
    assert s.patch(base + path, data=b"x", headers=headers).status_code == 400


def test_patch_at_and_past_upload_length(s, base, sample_webm):
    path = new_upload(s, base, 1000)
    too_long = patch(s, base, path, 0, sample_webm[:1001])
    assert too_long.status_code == 413
    assert _tus.offset_of(s, base, path) == 0
    exact = patch(s, base, path, 0, sample_webm[:1000])
    assert exact.status_code == 204 and exact.headers["Upload-Offset"] == "1000"
    assert patch(s, base, path, 1000, b"x").status_code == 413


def test_patch_without_content_length_is_refused(base):
    import _http
    path = new_upload(requests.Session(), base, 100)
    reply = _http.request(base, "PATCH", path, headers=[
        ("Tus-Resumable", "1.0.0"), ("Upload-Offset", "0"), ("Content-Type", OFFSET_TYPE),
        ("Transfer-Encoding", "chunked")], body=b"5\r\nhello\r\n0\r\n\r\n",
        content_length=False)
    # refused by the HTTP edge (httphead.py) for every route, before tus reads a header
    assert reply.status == 411 and reply.json()["error"]["code"] == "length_required"
    assert reply.header("connection") == "close"


def test_first_bytes_must_be_a_video_unless_any_content_is_allowed(server_factory, s, base):
    path = new_upload(s, base, 100)
    refused = patch(s, base, path, 0, b"%PDF-1.7" + b"\0" * 92)
    assert refused.status_code == 415
    assert _tus.offset_of(s, base, path) == 0
    relaxed = server_factory(args=["--allow-any-content"])
    other = new_upload(s, relaxed.url, 100)
    assert patch(s, relaxed.url, other, 0, b"%PDF-1.7" + b"\0" * 92).status_code == 204


# ---------------------------------------------------------------------------------------------
# Checksum
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["sha1", "md5", "sha256", "sha512", "crc32"])
def test_checksum_that_matches_is_stored(s, base, sample_webm, algorithm, tus_server):
    data = sample_webm[:40000]                   # more than two pieces: all stored after it
    path = new_upload(s, base, 50000)
    response = patch(s, base, path, 0, data,
                     {"Upload-Checksum": _tus.checksum(algorithm, data)})
    assert response.status_code == 204
    assert response.headers["Upload-Offset"] == "40000"
    assert tus_server.storage.received(_tus.upload_id(path)) == data


@pytest.mark.parametrize("algorithm", ["sha1", "crc32"])
def test_checksum_mismatch_is_460_and_nothing_is_appended(s, base, sample_webm, algorithm,
                                                          tus_server):
    data = sample_webm[:40000]
    path = new_upload(s, base, 50000)
    assert patch(s, base, path, 0, data[:100]).status_code == 204
    wrong = _tus.checksum(algorithm, data[100:] + b"!")
    response = patch(s, base, path, 100, data[100:], {"Upload-Checksum": wrong})
    assert response.status_code == 460
    assert response.json()["error"]["code"] == "checksum_mismatch"
    assert _tus.offset_of(s, base, path) == 100
    assert tus_server.storage.received(_tus.upload_id(path)) == data[:100]
    right = patch(s, base, path, 100, data[100:],
                  {"Upload-Checksum": _tus.checksum(algorithm, data[100:])})
    assert right.status_code == 204


@pytest.mark.parametrize("value,code", [
    ("sha3 AAAA", "unsupported_checksum"), ("SHA1 " + "A" * 28, "unsupported_checksum"),
    ("sha1", "invalid_checksum"), ("sha1 not*base64", "invalid_checksum"),
    ("sha1 AAA", "invalid_checksum"),
])
def test_unsupported_or_malformed_checksum_is_400(s, base, sample_webm, value, code):
    path = new_upload(s, base, 100)
    response = patch(s, base, path, 0, sample_webm[:10], {"Upload-Checksum": value})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    assert _tus.offset_of(s, base, path) == 0


# ---------------------------------------------------------------------------------------------
# creation-with-upload, creation-defer-length
# ---------------------------------------------------------------------------------------------

def test_creation_with_upload_stores_the_body(s, base, sample_webm):
    created = create(s, base, len(sample_webm), body=sample_webm[:30000])
    assert created.status_code == 201
    assert created.headers["Upload-Offset"] == "30000"
    path = location(created)
    assert _tus.offset_of(s, base, path) == 30000
    assert patch(s, base, path, 30000, sample_webm[30000:]).status_code == 204
    assert _tus.video_bytes(s, base, _tus.upload_id(path)) == sample_webm
    whole = create(s, base, len(sample_webm), body=sample_webm)
    assert whole.headers["Upload-Offset"] == str(len(sample_webm))
    assert "Upload-Expires" not in whole.headers
    status = get_status(s, base, _tus.upload_id(location(whole))).json()["data"]
    assert status["state"] == "completed"


def test_creation_with_upload_refusals_create_nothing(s, base, sample_webm):
    wrong_type = create(s, base, 100, body=sample_webm[:10],
                        headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415
    file_id = "cwu_%d" % time.monotonic_ns()
    not_video = create(s, base, 100, body=b"not a video at all",
                       meta=metadata(fileId=file_id))
    assert not_video.status_code == 415
    assert "Location" not in not_video.headers
    assert get_status(s, base, file_id).json()["data"]["exists"] is False
    assert head(s, base, "/files/" + file_id).status_code == 404
    longer = create(s, base, 5, body=sample_webm[:6])
    assert longer.status_code == 413
    bad_sum = create(s, base, 100, body=sample_webm[:10], meta=metadata(fileId=file_id),
                     headers={"Upload-Checksum": _tus.checksum("sha1", b"other")})
    assert bad_sum.status_code == 460
    assert head(s, base, "/files/" + file_id).status_code == 404


def test_defer_length_then_length(s, base, sample_webm):
    path = new_upload(s, base, defer=True)
    answer = head(s, base, path)
    assert answer.headers["Upload-Defer-Length"] == "1"
    assert "Upload-Length" not in answer.headers
    assert patch(s, base, path, 0, sample_webm[:100000]).status_code == 204
    assert head(s, base, path).headers["Upload-Defer-Length"] == "1"
    assert s.get(base + "/api/video/status/" + _tus.upload_id(path)).json()["data"][
        "state"] == "uploading"
    # Past Tus-Max-Size, or below what was received: refused, still deferred.
    too_big = patch(s, base, path, 100000, b"", {"Upload-Length": str((8 << 20) + 1)})
    assert too_big.status_code == 413
    too_small = patch(s, base, path, 100000, b"", {"Upload-Length": "99999"})
    assert too_small.status_code == 400
    assert head(s, base, path).headers["Upload-Defer-Length"] == "1"
    done = patch(s, base, path, 100000, sample_webm[100000:],
                 {"Upload-Length": str(len(sample_webm))})
    assert done.status_code == 204
    answer = head(s, base, path)
    assert answer.headers["Upload-Length"] == str(len(sample_webm))
    assert "Upload-Defer-Length" not in answer.headers
    file_id = _tus.upload_id(path)
    assert get_status(s, base, file_id).json()["data"]["state"] == "completed"
    assert _tus.video_bytes(s, base, file_id) == sample_webm
    changed = patch(s, base, path, len(sample_webm), b"", {"Upload-Length": "1"})
    assert changed.status_code == 400
    assert changed.json()["error"]["code"] == "length_already_set"


def test_deferred_length_told_with_an_empty_patch_completes_the_upload(s, base, sample_webm):
    path = new_upload(s, base, defer=True)
    assert patch(s, base, path, 0, sample_webm).status_code == 204
    told = patch(s, base, path, len(sample_webm), b"", {"Upload-Length": str(len(sample_webm))})
    assert told.status_code == 204
    assert told.headers["Upload-Offset"] == str(len(sample_webm))
    data = get_status(s, base, _tus.upload_id(path)).json()["data"]
    assert data["state"] == "completed" and data["fileSize"] == len(sample_webm)


def test_deferred_upload_past_max_size_is_413(s, base, sample_webm):
    path = new_upload(s, base, defer=True)
    response = patch(s, base, path, 0, b"\x1a\x45\xdf\xa3" + bytes((8 << 20) - 3))
    assert response.status_code == 413
    assert _tus.offset_of(s, base, path) == 0


def test_empty_upload_is_not_a_video(s, base):
    refused = create(s, base, 0)
    assert refused.status_code == 415


# ---------------------------------------------------------------------------------------------
# Termination
# ---------------------------------------------------------------------------------------------

def test_termination_removes_the_upload_and_its_bytes(s, base, sample_webm, tus_server):
    file_id = "term_%d" % time.monotonic_ns()
    path = new_upload(s, base, len(sample_webm), meta=metadata(fileId=file_id))
    assert patch(s, base, path, 0, sample_webm[:50000]).status_code == 204
    assert tus_server.storage.holds(file_id)
    response = s.delete(base + path, headers=TUS)
    assert response.status_code == 204
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert not tus_server.storage.holds(file_id)
    assert head(s, base, path).status_code == 404
    assert patch(s, base, path, 50000, sample_webm[50000:]).status_code == 404
    assert s.delete(base + path, headers=TUS).status_code == 404
    assert get_status(s, base, file_id).json()["data"]["exists"] is False
    # The name is free again; so is a finished upload's, which termination also removes.
    again = finished_upload(s, base, sample_webm, metadata(fileId=file_id))
    assert s.delete(base + again, headers=TUS).status_code == 204
    assert s.get(base + "/uploads/%s.webm" % file_id).status_code == 404


def test_an_upload_deleted_through_the_seed_api_is_gone_at_its_tus_url(s, base, sample_webm):
    file_id = "apidel_%d" % time.monotonic_ns()
    path = new_upload(s, base, len(sample_webm), meta=metadata(fileId=file_id))
    assert patch(s, base, path, 0, sample_webm[:50000]).status_code == 204
    assert s.delete(base + "/api/video/" + file_id).status_code == 200
    assert head(s, base, path).status_code == 410
    assert patch(s, base, path, 50000, sample_webm[50000:]).status_code == 410


# ---------------------------------------------------------------------------------------------
# Concatenation
# ---------------------------------------------------------------------------------------------

def partial(s, base, data):
    path = new_upload(s, base, len(data), concat="partial")
    if data:
        assert patch(s, base, path, 0, data).status_code == 204
    return path


def test_concatenation_of_three_partials(s, base, sample_webm, tus_server):
    cut = [0, 70001, 140003, len(sample_webm)]
    pieces = [sample_webm[cut[i]:cut[i + 1]] for i in range(3)]
    parts = [partial(s, base, piece) for piece in reversed(pieces)][::-1]   # any order
    answer = head(s, base, parts[1])
    assert answer.headers["Upload-Concat"] == "partial"
    assert answer.headers["Upload-Offset"] == answer.headers["Upload-Length"]
    # Partials are pieces, not videos: the second does not start with a signature, and none
    # appears in the seed world.
    assert get_status(s, base, _tus.upload_id(parts[1])).json()["data"]["exists"] is False
    file_id = "concat_%d" % time.monotonic_ns()
    urls = [parts[0], base + parts[1], parts[2]]        # absolute or relative
    final_header = "final;" + " ".join(urls)
    created = create(s, base, meta=metadata(fileId=file_id, filetype="video/webm"),
                     concat=final_header)
    assert created.status_code == 201
    final = location(created)
    assert final == "/files/" + file_id
    answer = head(s, base, final)
    assert answer.status_code == 200
    assert answer.headers["Upload-Concat"] == final_header
    assert answer.headers["Upload-Length"] == answer.headers["Upload-Offset"] == \
        str(len(sample_webm))
    assert "Upload-Expires" not in answer.headers
    data = get_status(s, base, file_id).json()["data"]
    assert data["state"] == "completed" and data["fileSize"] == len(sample_webm)
    assert _tus.video_bytes(s, base, file_id) == sample_webm
    forbidden = patch(s, base, final, len(sample_webm), b"x")
    assert forbidden.status_code == 403
    # Partials stay usable (and removable) after the final was made from them.
    again = create(s, base, concat="final;" + " ".join(parts))
    assert again.status_code == 201
    assert _tus.video_bytes(s, base, _tus.upload_id(location(again))) == sample_webm
    for path in parts:
        assert s.delete(base + path, headers=TUS).status_code == 204
    assert _tus.video_bytes(s, base, file_id) == sample_webm


def test_final_refuses_bad_partials(s, base, sample_webm):
    done = partial(s, base, sample_webm[:1000])
    unfinished = new_upload(s, base, 1000, concat="partial")
    assert patch(s, base, unfinished, 0, b"abc").status_code == 204
    single = finished_upload(s, base, sample_webm[:1000])
    cases = [
        ("final;%s %s" % (done, unfinished), 400, "partial_unfinished"),
        ("final;%s %s" % (done, single), 400, "not_partial"),
        ("final;%s /files/tuspart_nothing" % done, 404, "not_found"),
        ("final;%s /elsewhere/x" % done, 400, "invalid_concat"),
        ("final;", 400, "invalid_concat"),
        ("final %s" % done, 400, "invalid_concat"),
    ]
    for header, status, code in cases:
        response = create(s, base, concat=header)
        assert response.status_code == status, header
        assert response.json()["error"]["code"] == code, header
    with_length = create(s, base, 1000, concat="final;" + done)
    assert with_length.status_code == 400
    not_video = partial(s, base, b"this is text")
    refused = create(s, base, concat="final;%s %s" % (not_video, done))
    assert refused.status_code == 415


def test_partial_count_at_and_past_its_limit(server_factory, sample_webm):
    srv = server_factory(args=["--tus-max-partials", "3"])
    with requests.Session() as s:
        parts = [partial(s, srv.url, sample_webm[:10])] + \
            [partial(s, srv.url, b"x") for _ in range(3)]
        assert create(s, srv.url, concat="final;" + " ".join(parts[:3])).status_code == 201
        refused = create(s, srv.url, concat="final;" + " ".join(parts))
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "too_many_partials"


def test_final_past_max_size_is_413(server_factory, sample_webm):
    srv = server_factory(args=["--max-upload-size", "300K"])
    with requests.Session() as s:
        parts = [partial(s, srv.url, sample_webm[:200 << 10]),
                 partial(s, srv.url, sample_webm[:100 << 10])]
        assert create(s, srv.url, concat="final;" + " ".join(parts)).status_code == 201
        parts.append(partial(s, srv.url, b"x"))
        assert create(s, srv.url, concat="final;" + " ".join(parts)).status_code == 413


# ---------------------------------------------------------------------------------------------
# Expiration
# ---------------------------------------------------------------------------------------------

def test_abandoned_uploads_expire_and_answer_410(server_factory, sample_webm):
    srv = server_factory(args=["--tus-expiry", "1"])
    with requests.Session() as s:
        created = create(s, srv.url, len(sample_webm))
        abandoned = location(created)
        assert patch(s, srv.url, abandoned, 0, sample_webm[:1000]).status_code == 204
        expires = email.utils.parsedate_to_datetime(created.headers["Upload-Expires"])
        assert expires.timestamp() <= time.time() + 2
        finished = finished_upload(s, srv.url, sample_webm)
        # The sweep removes it without any request asking.
        wait_until(lambda: not srv.storage.holds(_tus.upload_id(abandoned)), timeout=20,
                   message="sweep")
        answer = head(s, srv.url, abandoned)
        assert answer.status_code == 410
        assert "Upload-Offset" not in answer.headers
        assert patch(s, srv.url, abandoned, 1000, sample_webm[1000:]).status_code == 410
        assert get_status(s, srv.url, _tus.upload_id(abandoned)).json()["data"][
            "exists"] is False
        # A finished upload never expires.
        assert head(s, srv.url, finished).status_code == 200
        assert _tus.video_bytes(s, srv.url, _tus.upload_id(finished)) == sample_webm


def test_expiry_off_keeps_unfinished_uploads_and_drops_the_extension(server_factory):
    srv = server_factory(args=["--tus-expiry", "0"])
    with requests.Session() as s:
        assert "expiration" not in s.options(srv.url + "/files/").headers["Tus-Extension"]
        created = create(s, srv.url, 100)
        assert "Upload-Expires" not in created.headers
        assert "Upload-Expires" not in head(s, srv.url, location(created)).headers


def test_an_expired_upload_is_410_even_before_the_sweep(server_factory, sample_webm):
    """Checked on access too; the sweep only runs every half expiry at most."""
    srv = server_factory(args=["--tus-expiry", "0.5"])
    with requests.Session() as s:
        path = new_upload(s, srv.url, 100, concat="partial")
        wait_until(lambda: head(s, srv.url, path).status_code == 410, timeout=20,
                   message="expiry")
        file_id = "reuse_%d" % time.monotonic_ns()
        named = new_upload(s, srv.url, 100, meta=metadata(fileId=file_id))
        wait_until(lambda: head(s, srv.url, named).status_code == 410, timeout=20,
                   message="expiry")
        # The name of an expired upload can be used again.
        assert create(s, srv.url, 100, meta=metadata(fileId=file_id)).status_code == 201


def test_a_finished_upload_removed_by_gc_is_gone_at_its_tus_url(server_factory, sample_webm):
    """`m1server.py gc` deletes with the server stopped, so tus hears no event: a finished
    upload whose bytes are gone still answers 410, not an offset of 0."""
    import json
    import subprocess
    from conftest import SERVER_PROGRAM, SERVER_PYTHON
    srv = server_factory()
    with requests.Session() as s:
        path = finished_upload(s, srv.url, sample_webm)
        srv.stop()

        def collected():
            done = subprocess.run([SERVER_PYTHON, SERVER_PROGRAM, "gc", "--dir",
                                   srv.upload_dir, "--retention", "0.001"] + srv.args,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  env=srv.env)
            return json.loads(done.stdout.decode())["deleted"]

        assert wait_until(collected, message="gc") == [_tus.upload_id(path)]
        srv.start()
        assert head(s, srv.url, path).status_code == 410
