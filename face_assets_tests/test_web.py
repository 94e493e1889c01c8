"""The review web app's API: search, votes and undo, people curation, and every security guard.

Starlette's test client drives the real app over a real catalog (DuckDB, faiss, ONNX models);
concurrency and the server's own limits run against a real uvicorn server on loopback. The browser
flows are in ``test_web_browser.py``, the load test in ``test_web_load.py``.
"""

from __future__ import annotations

import io
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from face_assets import load_settings
from face_assets.auth import TokenStore
from face_assets.errors import ConfigError, CurationError
from face_assets.library import FaceRecognitionLibrary
from face_assets.web import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE, check_bind, create_app, serve


def web_settings(data_dir: Path, feedback: dict | None = None, **web) -> dict:
    """Overrides for a test library: the data folder, small uploads, the test client's Host allowed."""
    return {"storage": {"data_dir": str(data_dir)}, "feedback": {"max_upload_bytes": 400_000} | (feedback or {}),
            "web": {"allowed_hosts": ["testserver", "127.0.0.1", "localhost"]} | web}


@pytest.fixture()
def data_dir(indexed_dir, tmp_path) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(indexed_dir, folder)
    return folder


@contextmanager
def open_library(data_dir: Path, feedback: dict | None = None, **web) -> Iterator[FaceRecognitionLibrary]:
    """A library over ``data_dir`` with :func:`web_settings` and these ``feedback`` / ``web`` settings."""
    with FaceRecognitionLibrary(settings=load_settings(overrides=web_settings(data_dir, feedback, **web))) as library:
        yield library


@pytest.fixture()
def lib(data_dir) -> Iterator[FaceRecognitionLibrary]:
    with open_library(data_dir) as library:
        yield library


@pytest.fixture()
def tokens(data_dir) -> dict[str, str]:
    """One token per role, issued to a user of the same name."""
    store = TokenStore(data_dir / "auth" / "tokens.json")
    return {role: store.create(role, role)[1] for role in ("viewer", "reviewer", "admin")}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture()
def client(lib) -> TestClient:
    return TestClient(create_app(lib))


def search(client: TestClient, token: str, path: Path, **form) -> dict:
    r = client.post("/api/search", files={"image": (path.name, path.read_bytes(), "image/jpeg")}, data=form,
                    headers=bearer(token))
    assert r.status_code == 200, r.text
    return r.json()


def two_face_photo(feedback_people, tmp_path) -> Path:
    """Two LFW photos of two people side by side: a query image with two faces."""
    (a, *_), (b, *_) = list(feedback_people.values())[:2]
    both = np.hstack([cv2.imread(str(a)), cv2.imread(str(b))])
    path = tmp_path / "two_people.png"
    cv2.imwrite(str(path), both)
    return path


# -- search, votes, undo --------------------------------------------------------------------------

def test_searches_run_behind_the_services_short_requests(data_dir, tokens, feedback_people):
    """The threads that decode, detect and embed query images run at ``web.search_nice``; the
    service's other requests keep its priority."""
    import os
    import threading

    def nice(tid: int) -> int:
        return os.getpriority(os.PRIO_PROCESS, tid)

    before = nice(threading.get_native_id())
    with open_library(data_dir, search_nice=7) as library, TestClient(create_app(library)) as client:
        search(client, tokens["reviewer"], next(iter(feedback_people.values()))[1])
        pool = [t for t in threading.enumerate() if t.name.startswith("search_")]
        assert pool and {nice(t.native_id) for t in pool} == {max(before, 7)}
        assert client.get("/api/people", headers=bearer(tokens["viewer"])).status_code == 200
    assert nice(threading.get_native_id()) == before


def test_search_vote_undo_and_my_votes(client, lib, tokens, feedback_people, data_dir):
    photos = next(iter(feedback_people.values()))
    body = search(client, tokens["reviewer"], photos[1])
    assert set(body) == {"query_id", "query_face_id", "bbox", "faces", "face_index", "image_size", "image_url",
                         "threshold", "results"}
    assert body["threshold"] == lib.settings.search.match_threshold and len(body["faces"]) == 1
    assert body["image_size"] == list(Image.open(photos[1]).size)
    hits = body["results"]
    assert {h["is_match"] for h in hits} == {True, False}  # 3 more photos of the person, 8 of others
    assert all(h["is_match"] == (h["similarity"] >= body["threshold"]) for h in hits)
    thumb = client.get(hits[0]["thumbnail_url"], headers=bearer(tokens["viewer"]))
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert (data_dir / "thumbnails" / str(lib.settings.feedback.thumbnail_size) / f"{hits[0]['face_id']}.jpg").is_file()
    img = client.get(body["image_url"], headers=bearer(tokens["reviewer"]))
    assert img.status_code == 200 and cv2.imdecode(np.frombuffer(img.content, np.uint8), 1) is not None
    assert client.get(body["image_url"], headers=bearer(tokens["viewer"])).status_code == 403  # not theirs

    hit, qid = hits[3], body["query_id"]
    vote = {"query_id": qid, "result_id": hit["face_id"], "vote": "down"}
    r = client.post("/api/feedback", json=vote, headers=bearer(tokens["reviewer"]))
    assert r.status_code == 200 and r.json()["voter"] == "reviewer" and r.json()["revisions"] == 0
    r = client.post("/api/feedback", json=vote | {"vote": "up"}, headers=bearer(tokens["reviewer"]))
    assert r.json()["revisions"] == 1
    mine = client.get(f"/api/queries/{qid}/votes", headers=bearer(tokens["reviewer"])).json()
    assert mine == [{"result_id": hit["face_id"], "vote": "up"}]
    # a self-declared voter is refused: the voter is who authenticated
    r = client.post("/api/feedback", json=vote | {"voter": "mallory"}, headers=bearer(tokens["reviewer"]))
    assert r.status_code == 422
    assert [(v["voter"], v["vote"]) for v in lib.feedback.votes(query_id=qid)] == [("reviewer", "up")]

    assert client.delete(f"/api/feedback/{qid}/{hit['face_id']}", headers=bearer(tokens["reviewer"])).status_code == 200
    assert lib.feedback.votes(query_id=qid) == []
    assert client.delete(f"/api/feedback/{qid}/{hit['face_id']}", headers=bearer(tokens["reviewer"])).status_code == 404
    assert client.get(f"/api/queries/{qid}/votes", headers=bearer(tokens["reviewer"])).json() == []


def test_face_chooser_and_more_results(client, lib, tokens, feedback_people, tmp_path):
    photo = two_face_photo(feedback_people, tmp_path)
    first = search(client, tokens["viewer"], photo, top_k="4")
    assert len(first["faces"]) == 2 and len(first["results"]) == 4
    other = 1 - first["face_index"]
    second = search(client, tokens["viewer"], photo, face_index=str(other), top_k="4")
    assert second["face_index"] == other and second["bbox"] == first["faces"][other]
    assert second["results"][0]["face_id"] != first["results"][0]["face_id"]  # the other person's photos
    r = client.post("/api/search", files={"image": ("p.png", photo.read_bytes(), "image/png")},
                    data={"face_index": "7"}, headers=bearer(tokens["viewer"]))
    assert r.status_code == 422 and "no face" in r.json()["detail"]

    more = client.get(f"/api/queries/{first['query_id']}/results", params={"offset": 4, "limit": 5},
                      headers=bearer(tokens["viewer"]))
    assert more.status_code == 200, more.text
    shown = [h["face_id"] for h in first["results"]] + [h["face_id"] for h in more.json()]
    assert len(more.json()) == 5 and len(set(shown)) == 9
    sims = [h["similarity"] for h in first["results"] + more.json()]
    assert sims == sorted(sims, reverse=True)


def test_person_names_in_results(client, lib, tokens, feedback_people):
    lib.cluster()
    photos = next(iter(feedback_people.values()))
    top = search(client, tokens["viewer"], photos[0])["results"][1]
    assert top["cluster_id"] is not None and top["person"] is None
    lib.rename(top["cluster_id"], "Ada Lovelace")
    again = search(client, tokens["viewer"], photos[0])["results"][1]
    assert again["person"] == "Ada Lovelace"


def test_query_face_excluded_from_results(client, lib, tokens):
    face_id = lib.catalog.valid_face_ids(lib.model_version).tolist()[0]
    r = client.post("/api/search", data={"face_id": str(face_id)}, headers=bearer(tokens["viewer"]))
    assert face_id not in [h["face_id"] for h in r.json()["results"]]


def test_vote_only_on_a_result_of_the_query(client, lib, tokens, feedback_people):
    body = search(client, tokens["reviewer"], next(iter(feedback_people.values()))[0], top_k="2")
    shown = {h["face_id"] for h in body["results"]}
    stranger = next(f for f in lib.catalog.valid_face_ids(lib.model_version).tolist() if f not in shown)
    r = client.post("/api/feedback", json={"query_id": body["query_id"], "result_id": stranger, "vote": "up"},
                    headers=bearer(tokens["reviewer"]))
    assert r.status_code == 409 and lib.feedback.votes() == []


# -- people ---------------------------------------------------------------------------------------

def test_people_rename_merge_move_split_undo_and_audit(client, lib, tokens):
    lib.cluster()
    rev, adm = bearer(tokens["reviewer"]), bearer(tokens["admin"])
    page = client.get("/api/people", params={"limit": 2}, headers=bearer(tokens["viewer"])).json()
    assert page["total"] == len(lib.list_clusters()) >= 3 and len(page["items"]) == 2
    a, b = page["items"]
    assert a["size"] >= b["size"] and a["cover_url"] == f"/api/faces/{a['cover_face_id']}/thumbnail"
    rest = client.get("/api/people", params={"limit": 2, "offset": 2}, headers=rev).json()
    assert rest["total"] == page["total"] and rest["items"][0]["cluster_id"] not in (a["cluster_id"], b["cluster_id"])

    r = client.post(f"/api/people/{a['cluster_id']}/rename", json={"name": "  Grace Hopper "}, headers=rev)
    assert r.status_code == 200 and r.json()["persons"][0]["name"] == "Grace Hopper" and r.json()["change_id"]
    found = client.get("/api/people", params={"q": "grace"}, headers=rev).json()
    assert [p["cluster_id"] for p in found["items"]] == [a["cluster_id"]] and found["total"] == 1
    by_id = client.get("/api/people", params={"q": f"#{b['cluster_id']}"}, headers=rev).json()
    assert [p["cluster_id"] for p in by_id["items"]] == [b["cluster_id"]]
    assert client.get("/api/people", params={"q": "nobody"}, headers=rev).json()["total"] == 0
    viewer_try = client.post(f"/api/people/{a['cluster_id']}/rename", json={"name": "x"}, headers=bearer(tokens["viewer"]))
    assert viewer_try.status_code == 403

    merged = client.post("/api/people/merge", json={"cluster_ids": [a["cluster_id"], b["cluster_id"]]}, headers=rev)
    assert merged.status_code == 200 and merged.json()["persons"][0]["size"] == a["size"] + b["size"]
    kept = merged.json()["persons"][0]["cluster_id"]
    faces = [f["face_id"] for f in client.get(f"/api/people/{kept}", headers=rev).json()["faces"]]
    second = client.get(f"/api/people/{kept}", params={"offset": 1, "limit": 2}, headers=rev).json()["faces"]
    assert [f["face_id"] for f in second] == faces[1:3]  # a page of a person's faces
    chosen = faces[:len(faces) - 1]  # the larger part: it still becomes the new person
    parts = client.post(f"/api/people/{kept}/split", json={"face_ids": chosen}, headers=rev)
    assert parts.status_code == 200, parts.text
    source, new = parts.json()["persons"]
    assert (source["cluster_id"], source["name"], source["size"]) == (kept, "Grace Hopper", 1)
    assert new["name"] is None and sorted(lib.get_cluster(new["cluster_id"]).face_ids) == sorted(chosen)

    # move: one call for several faces; refused unless they are the named person's faces
    assert client.post(f"/api/people/{kept}/move", json={"face_ids": chosen[:2], "to": new["cluster_id"]},
                       headers=rev).status_code == 409
    r = client.post(f"/api/people/{new['cluster_id']}/move", json={"face_ids": chosen[:2], "to": kept}, headers=rev)
    assert r.status_code == 200 and [p["cluster_id"] for p in r.json()["persons"]] == [kept, new["cluster_id"]]
    assert set(chosen[:2]) <= set(lib.get_cluster(kept).face_ids)
    move_id = r.json()["change_id"]
    everything = lib.get_cluster(new["cluster_id"]).face_ids
    r = client.post(f"/api/people/{new['cluster_id']}/move", json={"face_ids": everything, "to": kept}, headers=rev)
    assert [p["cluster_id"] for p in r.json()["persons"]] == [kept]  # the emptied person is gone
    assert client.get(f"/api/people/{new['cluster_id']}", headers=rev).status_code == 404
    undo = client.post(f"/api/audit/{r.json()['change_id']}/undo", headers=rev)
    assert undo.status_code == 200 and {p["cluster_id"] for p in undo.json()["persons"]} == {kept, new["cluster_id"]}
    assert sorted(lib.get_cluster(new["cluster_id"]).face_ids) == sorted(everything)  # back, under its id
    assert client.post(f"/api/audit/{r.json()['change_id']}/undo", headers=rev).status_code == 409  # done already
    assert client.post(f"/api/people/{kept}/split", json={"face_ids": lib.get_cluster(kept).face_ids},
                       headers=rev).status_code == 409  # nothing would be left
    assert client.post("/api/people/merge", json={"cluster_ids": [kept, 99999]}, headers=rev).status_code == 404
    assert client.get("/api/people/99999", headers=rev).status_code == 404

    assert client.get("/api/audit", headers=bearer(tokens["viewer"])).status_code == 403
    log = client.get("/api/audit", headers=adm).json()
    assert [(e["actor"], e["action"]) for e in log] == [("reviewer", "undo"), ("reviewer", "move"),
                                                        ("reviewer", "move"), ("reviewer", "split"),
                                                        ("reviewer", "merge"), ("reviewer", "rename")]
    assert log[5]["old"] is None and log[5]["new"] == "Grace Hopper" and log[4]["kept"] == kept
    assert log[2]["id"] == move_id and log[0]["undoes"] == log[1]["id"]
    mine = client.get("/api/audit", params={"cluster_id": new["cluster_id"], "limit": 2}, headers=rev).json()
    assert [e["action"] for e in mine] == ["undo", "move"]
    older = client.get("/api/audit", params={"cluster_id": new["cluster_id"], "before": mine[1]["id"]},
                       headers=rev).json()
    assert [e["action"] for e in older] == ["move", "split"]


def test_former_audit_file_is_taken_in_once_by_migrate(data_dir, lib):
    import json

    from face_assets.errors import MigrationRequiredError
    from face_assets.migrate import migrate_data_folder

    lib.cluster()
    cid = lib.list_clusters()[0].cluster_id
    lines = [{"at": "2026-01-02T03:04:05+00:00", "actor": "ann", "action": "rename", "cluster_id": cid, "old": None,
              "new": "Ann"}, {"at": "2026-01-02T03:05:00+00:00", "actor": "ann", "action": "merge",
                              "cluster_ids": [cid, 99], "kept": cid}]
    legacy = data_dir / "audit" / "people.jsonl"
    legacy.parent.mkdir(parents=True, exist_ok=True)
    legacy.write_text("".join(json.dumps(e) + "\n" for e in lines))
    lib.close()
    with pytest.raises(MigrationRequiredError, match="face-assets migrate"), open_library(data_dir):
        pass
    settings = load_settings(overrides=web_settings(data_dir, None))
    assert len(migrate_data_folder(settings)) == 1
    with open_library(data_dir) as again:
        log = again.curation_log(limit=10)
        assert [(e["actor"], e["action"]) for e in log] == [("ann", "merge"), ("ann", "rename")]
        assert log[1]["new"] == "Ann" and log[0]["kept"] == cid and log[0]["cluster_ids"] == sorted([cid, 99])
        assert not legacy.exists() and legacy.with_name("people.jsonl.imported").is_file()
        with pytest.raises(CurationError, match="without what undoing it needs"):
            again.undo(log[0]["id"])
    assert migrate_data_folder(settings) == []  # taken in once
    with open_library(data_dir) as third:
        assert len(third.curation_log(limit=10)) == 2


def test_catalog_faces_name_their_person(client, lib, tokens):
    lib.cluster()
    auth = bearer(tokens["viewer"])
    first = client.get("/api/faces", params={"limit": 5}, headers=auth).json()
    more = client.get("/api/faces", params={"limit": 5, "offset": 5}, headers=auth).json()
    ids = [f["face_id"] for f in first + more]
    assert ids == lib.catalog.valid_face_ids(lib.model_version).tolist()[:10]
    assert all(f["cluster_id"] == lib.persons.store.cluster_ids([f["face_id"]])[f["face_id"]] for f in first + more)


def test_names_are_normalised(client, lib, tokens):
    lib.cluster()
    cid = lib.list_clusters()[0].cluster_id
    rev = bearer(tokens["reviewer"])
    for bad in ["evil\u202e", "nul\x00", "two\nlines", "x" * 201, "\u2067rtl"]:
        r = client.post(f"/api/people/{cid}/rename", json={"name": bad}, headers=rev)
        assert r.status_code == 422, (bad, r.status_code)
    assert lib.get_cluster(cid).label is None
    r = client.post(f"/api/people/{cid}/rename", json={"name": "Jose\u0301"}, headers=rev)
    assert r.json()["persons"][0]["name"] == "Jos\u00e9" == lib.get_cluster(cid).label  # NFC


# -- security: authentication, roles, sessions, CSRF ----------------------------------------------

API_ROUTES = [("GET", "/api/me"), ("POST", "/api/search"), ("POST", "/api/feedback"), ("GET", "/api/faces"),
              ("GET", "/api/faces/1/thumbnail"), ("GET", "/api/people"), ("GET", "/api/people/1"),
              ("POST", "/api/people/1/rename"), ("POST", "/api/people/merge"), ("GET", "/api/audit"),
              ("GET", "/api/feedback/stats"), ("DELETE", "/api/feedback/q/1"), ("GET", "/api/queries/q/votes")]


def test_every_api_route_needs_a_valid_token(client, lib, tokens, data_dir):
    for method, url in API_ROUTES:
        for headers in ({}, bearer("fa_000000000000_" + "x" * 43), bearer(tokens["viewer"] + "x"),
                        {"Authorization": "Basic dmlld2VyOnZpZXdlcg=="}):
            r = client.request(method, url, headers=headers)
            assert r.status_code == 401, (method, url, headers, r.status_code)
    assert client.get("/api/health").json() == {"status": "ok"}  # liveness only, no data
    page = client.get("/", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login"
    assert client.get("/people", follow_redirects=False).status_code == 303
    # revocation takes effect on the next request, while the server runs
    assert client.get("/api/me", headers=bearer(tokens["admin"])).json() == {"name": "admin", "role": "admin",
                                                                              "auth": "tokens"}
    assert [r.id for r in TokenStore(data_dir / "auth" / "tokens.json").revoke("admin")]
    assert client.get("/api/me", headers=bearer(tokens["admin"])).status_code == 401


def test_roles(client, lib, tokens, feedback_people):
    body = search(client, tokens["viewer"], next(iter(feedback_people.values()))[0])
    vote = {"query_id": body["query_id"], "result_id": body["results"][1]["face_id"], "vote": "up"}
    assert client.post("/api/feedback", json=vote, headers=bearer(tokens["viewer"])).status_code == 403
    assert client.get("/api/feedback/stats", headers=bearer(tokens["reviewer"])).status_code == 403
    assert client.get("/api/feedback/stats", headers=bearer(tokens["admin"])).json()["queries"] == 1
    assert lib.feedback.votes() == []


def test_token_file_holds_only_hashes(data_dir, tokens):
    text = (data_dir / "auth" / "tokens.json").read_text()
    # the secret itself may contain "_", so split off only the prefix and the id
    assert all(t not in text and t.split("_", 2)[2] not in text for t in tokens.values())
    assert (data_dir / "auth" / "tokens.json").stat().st_mode & 0o077 == 0
    with pytest.raises(ConfigError):
        TokenStore(data_dir / "auth" / "tokens.json").create("eve", "root")


def test_page_login_session_and_csrf(client, lib, tokens, feedback_people):
    login_page = client.get("/login")
    assert login_page.status_code == 200 and CSRF_COOKIE in client.cookies
    csrf = {CSRF_HEADER: client.cookies[CSRF_COOKIE]}
    # login itself needs the CSRF header (no login CSRF), and a valid token
    assert client.post("/api/login", json={"token": tokens["reviewer"]}).status_code == 403
    assert client.post("/api/login", json={"token": "nope"}, headers=csrf).status_code == 401
    r = client.post("/api/login", json={"token": tokens["reviewer"]}, headers=csrf)
    assert r.status_code == 200 and r.json() == {"name": "reviewer", "role": "reviewer"}
    cookie = r.headers["set-cookie"]
    assert SESSION_COOKIE in cookie and "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert tokens["reviewer"] not in cookie  # the session names the token id, never the token
    assert client.get("/").status_code == 200 and client.get("/api/me").json()["name"] == "reviewer"

    photo = next(iter(feedback_people.values()))[0]
    upload = {"image": (photo.name, photo.read_bytes(), "image/jpeg")}
    # a cross-site form (no CSRF header) with the session cookie is refused before any work
    assert client.post("/api/search", files=upload).status_code == 403
    assert client.post("/api/search", files=upload, headers={CSRF_HEADER: "forged"}).status_code == 403
    assert lib.feedback_stats()["queries"] == 0
    body = client.post("/api/search", files=upload, headers=csrf).json()
    vote = {"query_id": body["query_id"], "result_id": body["results"][1]["face_id"], "vote": "down"}
    assert client.post("/api/feedback", json=vote).status_code == 403
    assert client.post("/api/feedback", json=vote, headers=csrf).json()["voter"] == "reviewer"
    assert client.post("/api/logout", headers=csrf).status_code == 200
    assert client.get("/api/me").status_code == 401


def page_login(client: TestClient, token: str) -> dict[str, str]:
    """Log ``client`` in through the page flow; returns the CSRF header its writes need."""
    client.get("/login")
    csrf = {CSRF_HEADER: client.cookies[CSRF_COOKIE]}
    assert client.post("/api/login", json={"token": token}, headers=csrf).status_code == 200
    return csrf


def test_logout_ends_the_session_on_the_server(lib, tokens):
    app = create_app(lib)
    browser = TestClient(app)
    csrf = page_login(browser, tokens["admin"])
    copied = browser.cookies[SESSION_COOKIE]  # e.g. taken from the machine before the user logged out
    thief = TestClient(app, cookies={SESSION_COOKIE: copied})
    assert thief.get("/api/audit").status_code == 200
    assert browser.post("/api/logout", headers=csrf).status_code == 200
    assert browser.get("/api/me").status_code == 401
    for url in ["/api/me", "/api/audit", "/api/people"]:
        assert thief.get(url).status_code == 401, url
    assert thief.get("/", follow_redirects=False).status_code == 303
    other = TestClient(app)  # another login of the same token is a session of its own
    page_login(other, tokens["admin"])
    assert other.get("/api/me").status_code == 200 and thief.get("/api/me").status_code == 401


def test_votes_only_from_the_querys_searcher(client, lib, tokens, data_dir, feedback_people):
    other = TokenStore(data_dir / "auth" / "tokens.json").create("eve", "reviewer")[1]
    body = search(client, tokens["reviewer"], next(iter(feedback_people.values()))[0])
    qid, face = body["query_id"], body["results"][1]["face_id"]
    vote = {"query_id": qid, "result_id": face, "vote": "down"}
    for intruder in (other, tokens["admin"]):
        r = client.post("/api/feedback", json=vote, headers=bearer(intruder))
        assert r.status_code == 403 and "your own searches" in r.json()["detail"]
    assert lib.feedback.votes(query_id=qid) == []
    assert client.post("/api/feedback", json=vote, headers=bearer(tokens["reviewer"])).status_code == 200
    assert client.delete(f"/api/feedback/{qid}/{face}", headers=bearer(other)).status_code == 403
    assert [v["voter"] for v in lib.feedback.votes(query_id=qid)] == ["reviewer"]
    assert client.post("/api/feedback", json=vote | {"query_id": "0" * 32},
                       headers=bearer(tokens["reviewer"])).status_code == 404


def test_failed_tokens_are_rate_limited_per_address_and_per_token(data_dir, tokens):
    with open_library(data_dir, auth_failure_limit="5/minute") as library:
        app = create_app(library)
        here, there = TestClient(app, client=("10.0.0.1", 5000)), TestClient(app, client=("10.0.0.2", 5000))
        wrong = [bearer(f"fa_{i:012x}_" + "x" * 43) for i in range(6)]
        codes = [here.get("/api/me", headers=h).status_code for h in wrong]
        assert codes == [401] * 5 + [429] and int(here.get("/api/me", headers=wrong[0]).headers["retry-after"]) >= 1
        # the address is slowed down, valid tokens included; another address is not
        assert here.get("/api/me", headers=bearer(tokens["viewer"])).status_code == 429
        assert there.get("/api/me", headers=bearer(tokens["viewer"])).status_code == 200
        # guessing one token's secret from many addresses: limited per token id too
        real_id = tokens["reviewer"].split("_")[1]
        guesses = [TestClient(app, client=(f"10.0.1.{i}", 5000)).get(
            "/api/me", headers=bearer(f"fa_{real_id}_" + "y" * 43)).status_code for i in range(6)]
        assert guesses == [401] * 5 + [429]
        assert not any(r.status_code == 200 for r in [there.get("/api/me", headers=h) for h in wrong])


def test_api_schema_needs_a_token(client, tokens):
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/openapi.json", headers=bearer("fa_" + "0" * 12 + "_" + "x" * 43)).status_code == 401
    assert client.get("/openapi.json", headers=bearer(tokens["viewer"])).status_code == 200


def test_early_413_and_errors_carry_the_security_headers(data_dir, tokens):
    with open_library(data_dir) as library, uvicorn_server(create_app(library)) as base:
        big = httpx.post(f"{base}/api/feedback", content=b"x" * 100_000, headers=bearer(tokens["reviewer"]) | {
            "Content-Type": "application/json"})
        assert big.status_code == 413
        for r in [big, httpx.get(f"{base}/api/me"), httpx.get(f"{base}/nothing"),
                  httpx.get(f"{base}/api/me", headers={"Host": "evil.example"})]:
            assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), r.status_code
            assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"


def test_no_auth_mode_is_loopback_only_and_still_csrf_safe(data_dir, feedback_people, caplog):
    with open_library(data_dir, auth="none") as library:
        with pytest.raises(ConfigError, match="loopback"):
            serve(library, host="0.0.0.0", port=1)
        with pytest.raises(ConfigError, match="loopback"):
            check_bind(library, "192.168.1.10")
        with caplog.at_level("WARNING", logger="face_assets.web.app"):
            check_bind(library, "127.0.0.1")
        assert "AUTHENTICATION IS OFF" in caplog.text
        client = TestClient(create_app(library))
        assert client.get("/api/me").json() == {"name": "local", "role": "admin", "auth": "none"}
        photo = next(iter(feedback_people.values()))[0]
        upload = {"image": (photo.name, photo.read_bytes(), "image/jpeg")}
        # a form on another origin cannot post: every write needs the CSRF header
        assert client.post("/api/search", files=upload).status_code == 403
        assert library.feedback_stats()["queries"] == 0
        client.get("/")
        r = client.post("/api/search", files=upload, headers={CSRF_HEADER: client.cookies[CSRF_COOKIE]})
        assert r.status_code == 200


def test_security_headers_and_host_allowlist(client, tokens):
    for url in ["/login", "/api/health", "/static/app.css", "/api/nothing", "/api/me"]:
        h = client.get(url).headers
        assert "frame-ancestors 'none'" in h["content-security-policy"], url
        assert "script-src 'self'" in h["content-security-policy"]
        assert h["x-content-type-options"] == "nosniff" and h["referrer-policy"] == "no-referrer", url
        assert h["x-frame-options"] == "DENY"
    for host in ["evil.example", "attacker.test:8000", "127.0.0.1.nip.io"]:
        r = client.get("/api/me", headers=bearer(tokens["admin"]) | {"Host": host})
        assert r.status_code == 400, host
    page = client.get("/login").text + client.get("/static/search.html").text + client.get("/static/people.html").text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # no external assets
    assert "<script>" not in page and "style=" not in page  # nothing inline: the CSP allows 'self' only
    assert client.get("/favicon.ico").headers["content-type"].startswith("image/svg+xml")


# -- security: limits -----------------------------------------------------------------------------

def test_body_limits_answer_413_unread_and_errors_do_not_echo(client, lib, tokens):
    auth = bearer(tokens["reviewer"]) | {"Content-Type": "application/json"}
    big = b'{"query_id": "' + b"A" * 50_000_000 + b'", "result_id": 1, "vote": "up"}'
    r = client.post("/api/feedback", content=big, headers=auth)
    assert r.status_code == 413 and len(r.content) < 200

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(100):
            yield b"B" * 10_000

    r = client.post("/api/feedback", content=chunks(), headers=auth)
    assert r.status_code == 413
    r = client.post("/api/search", files={"image": ("big.jpg", b"\xff" * 500_000, "image/jpeg")},
                    headers=bearer(tokens["viewer"]))
    assert r.status_code == 413
    marker = "Z" * 30_000
    r = client.post("/api/feedback", json={"query_id": "q", "result_id": 1, "vote": marker}, headers=auth)
    assert r.status_code == 422 and marker[:100] not in r.text and len(r.content) < 2000
    r = client.post("/api/feedback", json={"query_id": "q", "result_id": 1, "vote": "up", marker: 1}, headers=auth)
    assert r.status_code == 422 and marker[:100] not in r.text
    r = client.post("/api/feedback", json={"query_id": marker[:64], "result_id": 1, "vote": "up"}, headers=auth)
    assert r.status_code == 404 and marker[:64] not in r.text
    assert lib.feedback.votes() == []


def test_bad_input_is_a_typed_4xx(client, lib, tokens):
    auth = bearer(tokens["reviewer"])
    for url in ["/api/faces?offset=99999999999999999999", "/api/faces?limit=0", "/api/faces?offset=-1",
                "/api/faces/99999999999999999999/thumbnail", "/api/people?offset=99999999999999999999",
                "/api/people/0", "/api/queries/nope/results?offset=999", "/api/faces/abc/thumbnail"]:
        r = client.get(url, headers=auth)
        assert 400 <= r.status_code < 500, (url, r.status_code, r.text)
    assert client.get("/api/faces/999999/thumbnail", headers=auth).status_code == 404
    assert client.get("/api/queries/nope/votes", headers=auth).status_code == 404
    bad_forms = [{"face_id": "../etc"}, {"face_id": "99999999999999999999"}, {"face_id": "1", "top_k": "100000"},
                 {}, {"face_id": "1", "image": "text, not a file"}]
    for form in bad_forms:
        r = client.post("/api/search", data=form, headers=auth)
        assert r.status_code == 422, (form, r.text)
    r = client.post("/api/search", files={"image": ("x.jpg", b"not an image", "image/jpeg")}, headers=auth)
    assert r.status_code == 400 and "cannot read the image" in r.json()["detail"]
    assert client.post("/api/search", data={"face_id": "999999"}, headers=auth).status_code == 404
    assert lib.feedback_stats()["queries"] == 0


def test_images_only_by_id(client, lib, tokens):
    auth = bearer(tokens["admin"])
    for url in ["/api/faces/../../../../etc/passwd/thumbnail", "/api/faces/..%2F..%2F..%2Fetc%2Fpasswd/thumbnail",
                "/api/faces/%2e%2e/%2e%2e/etc/passwd", "/api/faces/-1/thumbnail", "/api/faces/0x1/thumbnail",
                "/static/../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd", "/api/queries/..%2F..%2Fetc/image",
                "//etc/passwd"]:
        r = client.get(url, headers=auth)
        assert r.status_code in (400, 404, 405, 422), (url, r.status_code)
        assert "root:" not in r.text and r.headers.get("content-type") != "image/jpeg"


def test_pixel_budget_refuses_cheaply_and_downscales(client, lib, tokens, feedback_people):
    auth = bearer(tokens["viewer"])
    bomb = io.BytesIO()
    Image.new("L", (7900, 7900)).save(bomb, "PNG", optimize=True)  # ~60 KB, 62 Mpx
    start = time.perf_counter()
    r = client.post("/api/search", files={"image": ("bomb.png", bomb.getvalue(), "image/png")}, headers=auth)
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    assert time.perf_counter() - start < 1.0  # refused from the header, not decoded
    photo = next(iter(feedback_people.values()))[0]
    big = cv2.resize(cv2.imread(str(photo)), (2400, 2400), interpolation=cv2.INTER_CUBIC)  # 5.8 Mpx > 4 Mpx
    ok, jpeg = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 80])
    body = client.post("/api/search", files={"image": ("big.jpg", jpeg.tobytes(), "image/jpeg")}, headers=auth).json()
    w, h = body["image_size"]
    assert w * h <= lib.settings.web.max_query_pixels and w == h > 1500
    stored = Image.open(lib.feedback.get_query(body["query_id"])["image_path"])
    assert stored.size == (w, h) and body["results"][0]["similarity"] > 0.9


def test_rate_limits_per_token(data_dir, tokens, feedback_people):
    with open_library(data_dir, rate_limit="5/minute", search_rate_limit="2/minute") as library:
        client = TestClient(create_app(library))
        codes = [client.get("/api/me", headers=bearer(tokens["viewer"])).status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        r = client.get("/api/me", headers=bearer(tokens["viewer"]))
        assert int(r.headers["retry-after"]) >= 1
        assert client.get("/api/me", headers=bearer(tokens["reviewer"])).status_code == 200  # per token
        photo = next(iter(feedback_people.values()))[0]
        codes = [client.post("/api/search", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
                             headers=bearer(tokens["admin"])).status_code for _ in range(3)]
        assert codes == [200, 200, 429] and library.feedback_stats()["queries"] == 2


@contextmanager
def uvicorn_server(app) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port, in a thread."""
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


def test_concurrent_searches_beyond_the_limit_get_503(data_dir, tokens, feedback_people):
    photo = next(iter(feedback_people.values()))[0]
    big = cv2.resize(cv2.imread(str(photo)), (1900, 1900), interpolation=cv2.INTER_CUBIC)
    data = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
    with open_library(data_dir, max_concurrent_searches=1) as library, uvicorn_server(create_app(library)) as base:
        results: list[httpx.Response] = []

        def one() -> None:
            results.append(httpx.post(f"{base}/api/search", files={"image": ("q.jpg", data, "image/jpeg")},
                                      headers=bearer(tokens["viewer"]), timeout=120))

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
        busy = next(r for r in results if r.status_code == 503)
        assert busy.headers["retry-after"] == "2" and "busy" in busy.json()["detail"]
        assert library.feedback_stats()["queries"] == codes.count(200)


def test_openapi_describes_the_api(client, tokens):
    spec = client.get("/openapi.json", headers=bearer(tokens["viewer"])).json()
    assert {"/api/search", "/api/feedback", "/api/people/merge", "/api/faces/{face_id}/thumbnail"} <= set(spec["paths"])
    assert spec["components"]["schemas"]["FeedbackIn"]["properties"]["vote"]["enum"] == ["up", "down"]
    assert "image" in spec["paths"]["/api/search"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"][
        "properties"]


def test_feedback_store_lost_is_503_then_recovers(data_dir, tokens, feedback_people, postgres_dsn):
    import psycopg

    with open_library(data_dir, feedback={"backend": "postgresql", "postgresql_dsn": postgres_dsn}) as library:
        client = TestClient(create_app(library))
        body = search(client, tokens["reviewer"], next(iter(feedback_people.values()))[0])
        vote = {"query_id": body["query_id"], "result_id": body["results"][1]["face_id"], "vote": "up"}
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:  # the server drops our connection
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        r = client.post("/api/feedback", json=vote, headers=bearer(tokens["reviewer"]))
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert "unavailable" in r.json()["detail"] and "terminat" not in r.text  # no server internals
        r = client.post("/api/feedback", json=vote, headers=bearer(tokens["reviewer"]))
        assert r.status_code == 200 and [v["vote"] for v in library.feedback.votes()] == ["up"]


def test_token_cli_create_list_revoke_while_serving(client, data_dir, capsys):
    import json

    from face_assets.cli import main

    assert client.get("/api/me", headers=bearer("fa_" + "0" * 12 + "_" + "x" * 43)).status_code == 401
    assert main(["--data-dir", str(data_dir), "token", "create", "bob", "--role", "viewer", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    # the running app picks the new token up without a restart
    assert client.get("/api/me", headers=bearer(made["token"])).json()["name"] == "bob"
    assert main(["--data-dir", str(data_dir), "token", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(t["id"], t["name"], t["role"]) for t in listed] == [(made["id"], "bob", "viewer")]
    assert made["token"] not in json.dumps(listed)
    assert main(["--data-dir", str(data_dir), "token", "revoke", made["id"]]) == 0
    assert client.get("/api/me", headers=bearer(made["token"])).status_code == 401
    assert main(["--data-dir", str(data_dir), "token", "revoke", "bob"]) == 1  # nothing left to revoke
    assert main(["--data-dir", str(data_dir), "token", "create", "bad name!"]) == 1


def test_thumbnails_made_ahead_in_the_background(lib, data_dir, tokens):
    from face_assets.web.images import ThumbnailCache

    folder = data_dir / "thumbnails" / str(lib.settings.feedback.thumbnail_size)
    faces = lib.catalog.valid_face_ids(lib.model_version).tolist()
    stopped = threading.Event()
    stopped.set()
    assert ThumbnailCache(lib, data_dir / "thumbnails", lib.settings.feedback.thumbnail_size).prewarm(stopped) == 0
    with uvicorn_server(create_app(lib)):  # the app's start-up begins the warm-up
        deadline = time.monotonic() + 60
        while len(list(folder.glob("*.jpg"))) < len(faces):
            assert time.monotonic() < deadline, "thumbnails not made ahead"
            time.sleep(0.1)
    assert sorted(int(p.stem) for p in folder.glob("*.jpg")) == sorted(faces)
    assert not list(folder.glob("*.tmp"))
