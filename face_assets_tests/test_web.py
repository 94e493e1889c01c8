"""The search web app: JSON API, validation, path traversal, a real headless browser, and a load test.

The API tests go through Starlette's test client; the browser test drives the system's chromium
against a real uvicorn server on loopback; the load test runs ``benchmarks/feedback_load.py``
against ``face-assets serve`` in a subprocess.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

from benchmarks import feedback_load
from face_assets import load_settings
from face_assets.library import FaceRecognitionLibrary
from face_assets.web import SESSION_COOKIE, create_app

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture()
def data_dir(indexed_dir, tmp_path) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(indexed_dir, folder)
    return folder


@pytest.fixture()
def lib(data_dir) -> Iterator[FaceRecognitionLibrary]:
    settings = load_settings(overrides={"storage": {"data_dir": str(data_dir)}, "feedback": {"max_upload_bytes": 200_000}})
    with FaceRecognitionLibrary(settings=settings) as library:
        yield library


@pytest.fixture()
def client(lib) -> TestClient:
    return TestClient(create_app(lib))


def _search(client: TestClient, path: Path) -> dict:
    r = client.post("/api/search", files={"image": (path.name, path.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    return r.json()


def test_search_vote_and_thumbnail(client, lib, feedback_people):
    page = client.get("/")
    assert page.status_code == 200 and "thumbs up" in page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # no external assets
    session = client.cookies[SESSION_COOKIE]
    person, photos = next(iter(feedback_people.items()))
    body = _search(client, photos[1])
    assert set(body) == {"query_id", "query_face_id", "bbox", "results"} and len(body["results"]) == 12
    top = body["results"][0]
    assert set(top) == {"face_id", "image_id", "similarity", "cluster_id", "thumbnail_url"}
    assert top["face_id"] == body["query_face_id"] and top["similarity"] > 0.99 and top["cluster_id"] is None
    thumb = client.get(top["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    img = cv2.imdecode(np.frombuffer(thumb.content, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and max(img.shape[:2]) <= lib.settings.feedback.thumbnail_size

    hit = body["results"][3]
    r = client.post("/api/feedback", json={"query_id": body["query_id"], "result_id": hit["face_id"], "vote": "down"})
    assert r.status_code == 200, r.text
    vote = r.json()
    assert vote["vote"] == "down" and vote["voter"] == session and vote["revisions"] == 0
    assert abs(vote["similarity"] - hit["similarity"]) < 1e-4
    r = client.post("/api/feedback", json={"query_id": body["query_id"], "result_id": hit["face_id"], "vote": "up"})
    assert r.json()["revisions"] == 1 and r.json()["feedback_id"] == vote["feedback_id"]
    rows = lib.feedback.votes(query_id=body["query_id"])
    assert [(r["result_face_id"], r["vote"], r["voter"], r["session_id"]) for r in rows] == [
        (hit["face_id"], "up", session, session)]

    picked = client.post("/api/search", data={"face_id": str(hit["face_id"]), "top_k": "3"}).json()
    assert picked["query_face_id"] == hit["face_id"] and len(picked["results"]) == 3
    faces = client.get("/api/faces", params={"limit": 5}).json()
    assert len(faces) == 5 and all(f["thumbnail_url"].endswith("/thumbnail") for f in faces)
    assert client.get("/api/feedback/stats").json()["votes"] == 1


def test_feedback_validation_stores_nothing(client, lib, feedback_people):
    body = _search(client, next(iter(feedback_people.values()))[0])
    qid, fid = body["query_id"], body["results"][1]["face_id"]
    bad = [
        ("{not json", 422, "JSON"),
        ('{"query_id": "%s", "result_id": %d, "vote": "maybe"}' % (qid, fid), 422, "up"),
        ('{"query_id": "%s", "result_id": %d, "vote": "UP"}' % (qid, fid), 422, "up"),
        ('{"query_id": "%s", "result_id": "abc", "vote": "up"}' % qid, 422, "integer"),
        ('{"query_id": "%s", "result_id": true, "vote": "up"}' % qid, 422, "integer"),
        ('{"query_id": "%s", "result_id": -3, "vote": "up"}' % qid, 422, "greater"),
        ('{"query_id": "%s", "vote": "up"}' % qid, 422, "result_id"),
        ('{"query_id": "%s", "result_id": %d, "vote": "up", "admin": 1}' % (qid, fid), 422, "admin"),
        ('[1, 2]', 422, "dict"),
        ('{"query_id": "nope", "result_id": %d, "vote": "up"}' % fid, 404, "unknown query_id"),
        ('{"query_id": "%s", "result_id": 999999, "vote": "up"}' % qid, 404, "unknown face id"),
    ]
    for payload, status, text in bad:
        r = client.post("/api/feedback", content=payload, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (payload, r.text)
        assert text.lower() in r.text.lower(), (payload, r.text)
    assert lib.feedback.votes() == []


def test_search_validation(client, lib, datasets):
    assert "either" in client.post("/api/search").json()["detail"]
    r = client.post("/api/search", files={"image": ("x.jpg", b"not an image", "image/jpeg")})
    assert r.status_code == 400 and "cannot read the image" in r.json()["detail"]
    blank = (datasets / "corrupted" / "all_white_640x480.jpg").read_bytes()
    r = client.post("/api/search", files={"image": ("blank.jpg", blank, "image/jpeg")})
    assert r.status_code == 422 and "no face" in r.json()["detail"]
    r = client.post("/api/search", files={"image": ("big.jpg", b"\xff" * 200_001, "image/jpeg")})
    assert r.status_code == 413
    assert client.post("/api/search", data={"face_id": "999999"}).status_code == 404
    assert client.post("/api/search", data={"face_id": "../etc"}).status_code == 422
    assert lib.feedback_stats()["queries"] == 0
    queries_dir = lib.index_dir / lib.settings.feedback.query_dir
    assert not queries_dir.exists() or not any(queries_dir.iterdir())


def test_images_only_by_face_id(client, lib):
    for url in ["/api/faces/../../../../etc/passwd/thumbnail", "/api/faces/..%2F..%2F..%2Fetc%2Fpasswd/thumbnail",
                "/api/faces/%2e%2e/%2e%2e/etc/passwd", "/api/faces/1%2F..%2F..%2Fetc%2Fpasswd/thumbnail",
                "/api/faces/-1/thumbnail", "/api/faces/0x1/thumbnail", "/api/faces/999999/thumbnail",
                "/..%2F..%2Fetc%2Fpasswd", "/static/../../etc/passwd", "//etc/passwd"]:
        r = client.get(url)
        assert r.status_code in (404, 405, 422), (url, r.status_code)
        assert "root:" not in r.text and r.headers["content-type"] != "image/jpeg"
    # a face whose image file vanished is a 404, never another file
    face_id = lib.catalog.valid_face_ids(lib.model_version)[0]
    path = Path(lib.catalog.faces_by_id([face_id])[face_id]["path"])
    lib.catalog.query("UPDATE images SET path = ? WHERE path = ?", [str(path) + ".missing", str(path)])
    assert client.get(f"/api/faces/{face_id}/thumbnail").status_code == 404


def test_openapi_describes_the_api(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/search", "/api/feedback", "/api/faces/{face_id}/thumbnail"} <= set(spec["paths"])
    vote = spec["components"]["schemas"]["FeedbackIn"]["properties"]["vote"]
    assert vote["enum"] == ["up", "down"]


@contextmanager
def _uvicorn(app) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_browser_upload_search_thumbs_down(lib, feedback_people):
    if not CHROMIUM.is_file():
        pytest.fail("chromium not installed: run scripts/ci_system_packages.sh")
    from playwright.sync_api import sync_playwright

    photo = next(iter(feedback_people.values()))[2]
    with _uvicorn(create_app(lib)) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.locator("#gallery img").first.wait_for()
            page.set_input_files("#file", str(photo))
            page.click("#search-btn")
            card = page.locator(".card").nth(4)
            card.wait_for()
            face_id = int(card.get_attribute("data-face-id"))
            assert "similarity" in card.inner_text()
            card.locator("button[data-vote=down]").click()
            confirm = card.locator(".confirm")
            confirm.filter(has_text="Thanks").wait_for(timeout=10_000)
            assert "different person" in confirm.inner_text()
            assert card.locator("button[data-vote=down]").get_attribute("aria-pressed") == "true"
            session = next(c["value"] for c in page.context.cookies() if c["name"] == SESSION_COOKIE)
        finally:
            browser.close()
    rows = lib.feedback.votes()
    assert [(r["result_face_id"], r["vote"], r["voter"]) for r in rows] == [(face_id, "down", session)]
    assert Path(lib.feedback.get_query(rows[0]["query_id"])["image_path"]).read_bytes() == photo.read_bytes()


def test_load_every_acknowledged_vote_stored_once(data_dir):
    """~10 s of concurrent votes against ``face-assets serve``; figures go to the test output."""
    out = feedback_load.run(data_dir, seconds=10, clients=8, n_queries=3)
    print(f"\nfeedback load: {out['requests_per_second']} req/s, p99 {out['latency_ms']['p99']} ms, "
          f"{out['acknowledged']} acknowledged votes on {out['keys_acknowledged']} keys, {out['rows']} rows")
    assert out["errors"] == 0 and out["server_exit_code"] == 0, out
    assert out["exactly_once"] and out["duplicates"] == 0, out
    assert out["rows"] == out["keys_acknowledged"] and out["acknowledged"] > out["rows"] > 50  # updates happened
