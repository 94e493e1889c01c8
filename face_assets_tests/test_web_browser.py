"""The review pages in a real browser: the system's chromium (Playwright) against a real uvicorn server.

Flows: log in, search, choose another face of the query photo, vote, undo, more results, reload
and see the votes again; the people page: find by name, rename, merge, split. Screenshots of each
step are saved under the test's temporary folder (printed with ``-s``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect

from face_assets.audit import AuditLog
from face_assets.auth import TokenStore
from face_assets.web import create_app

from test_web import open_library, two_face_photo, uvicorn_server

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture()
def browser() -> Iterator:
    if not CHROMIUM.is_file():
        pytest.fail("chromium not installed: run scripts/ci_system_packages.sh")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def data_dir(indexed_dir, tmp_path) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(indexed_dir, folder)
    return folder


@pytest.fixture()
def shots(tmp_path) -> Path:
    folder = tmp_path / "screenshots"
    folder.mkdir()
    print(f"\nscreenshots: {folder}")
    return folder


def log_in(page, base: str, token: str) -> None:
    page.goto(base + "/")
    page.wait_for_url("**/login")
    page.fill("#token", token)
    page.click("#login-btn")
    page.wait_for_url(base + "/")


def test_login_search_choose_face_vote_undo_more_reload(browser, data_dir, feedback_people, tmp_path, shots):
    token = TokenStore(data_dir / "auth" / "tokens.json").create("ada", "reviewer")[1]
    photo = two_face_photo(feedback_people, tmp_path)
    with open_library(data_dir, feedback={"search_top_k": 6}) as lib, uvicorn_server(create_app(lib)) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(base + "/login")
        page.fill("#token", "fa_000000000000_" + "x" * 43)
        page.click("#login-btn")
        page.locator("#status").filter(has_text="unknown or revoked").wait_for()
        page.screenshot(path=shots / "01_login_refused.png")
        log_in(page, base, token)
        assert page.locator("#who").inner_text().startswith("ada")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.className") == "skip"  # keyboard: the skip link first
        page.keyboard.press("Enter")
        assert page.evaluate("document.activeElement.id") == "main"

        page.set_input_files("#file", str(photo))
        page.click("#search-btn")
        page.locator(".card").nth(5).wait_for()
        boxes = page.locator(".box")
        assert boxes.count() == 2 and page.locator(".box.chosen").count() == 1
        first_query = page.evaluate("JSON.parse(sessionStorage.getItem('face_assets.lastSearch')).search.query_id")
        page.screenshot(path=shots / "02_results.png", full_page=True)

        other = page.locator(".box:not(.chosen)")
        other_index = other.get_attribute("data-face-index")
        other.click()  # the face chooser: search the other person of the photo
        page.locator(f'.box.chosen[data-face-index="{other_index}"]').wait_for()
        query_id = page.evaluate("JSON.parse(sessionStorage.getItem('face_assets.lastSearch')).search.query_id")
        assert query_id != first_query
        cards = page.locator(".card")
        assert cards.count() == 6 and page.locator(".card.match").count() >= 1
        assert "match" in page.locator(".card.match").first.inner_text()
        page.screenshot(path=shots / "03_other_face.png", full_page=True)

        down, up = cards.nth(4), cards.nth(1)
        down_id, up_id = int(down.get_attribute("data-face-id")), int(up.get_attribute("data-face-id"))
        down.locator("button[data-vote=down]").click()
        down.locator(".confirm").filter(has_text="different person").wait_for()
        up.locator("button[data-vote=up]").focus()
        page.keyboard.press("Enter")  # keyboard voting
        up.locator(".confirm").filter(has_text="same person").wait_for()
        assert up.locator("button[data-vote=up]").get_attribute("aria-pressed") == "true"
        up.locator("button.undo").click()
        up.locator(".confirm").filter(has_text="withdrawn").wait_for()
        assert up.locator("button[data-vote=up]").get_attribute("aria-pressed") == "false"
        assert [(v["result_face_id"], v["vote"], v["voter"]) for v in lib.feedback.votes(query_id=query_id)] == [
            (down_id, "down", "ada")]

        page.click("#more")
        page.locator(".card").nth(6).wait_for()
        shown = page.locator(".card").count()
        ids = [page.locator(".card").nth(i).get_attribute("data-face-id") for i in range(shown)]
        assert shown > 6 and len(set(ids)) == shown, ids
        page.screenshot(path=shots / "04_voted_more.png", full_page=True)

        page.reload()
        page.locator("#status").filter(has_text="your 1 vote").wait_for()
        again = page.locator(f'.card[data-face-id="{down_id}"]')
        assert again.locator("button[data-vote=down]").get_attribute("aria-pressed") == "true"
        assert "different person" in again.locator(".confirm").inner_text()
        assert page.locator(".card").count() == shown and page.locator(".box").count() == 2
        page.screenshot(path=shots / "05_after_reload.png", full_page=True)
        assert page.locator(f'.card[data-face-id="{up_id}"] button[aria-pressed="true"]').count() == 0


def test_people_find_rename_merge_split(browser, data_dir, shots):
    token = TokenStore(data_dir / "auth" / "tokens.json").create("grace", "reviewer")[1]
    with open_library(data_dir) as lib, uvicorn_server(create_app(lib)) as base:
        lib.cluster()
        persons = lib.list_clusters()
        assert len(persons) >= 3
        first, second = persons[0], persons[1]
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        log_in(page, base, token)
        page.click("text=People")
        page.locator("a.person").nth(len(persons) - 1).wait_for()
        page.screenshot(path=shots / "11_people.png", full_page=True)

        page.click(f'a.person[data-cluster-id="{first.cluster_id}"]')
        page.locator(".face").first.wait_for()
        page.fill("#name", "Grace Hopper")
        page.click("#rename-btn")
        page.locator("#person-status").filter(has_text="Renamed to Grace Hopper").wait_for()
        assert lib.get_cluster(first.cluster_id).label == "Grace Hopper"
        assert "Grace Hopper" in page.locator("#person-title").inner_text()

        page.fill("#target", f"#{second.cluster_id}")
        page.click("#merge-btn")
        page.locator("#person-status").filter(has_text="Merged").wait_for()
        merged = lib.get_cluster(first.cluster_id)
        assert merged.size == first.size + second.size and merged.label == "Grace Hopper"
        page.screenshot(path=shots / "12_merged.png", full_page=True)

        faces = page.locator(".face")
        assert faces.count() == merged.size
        chosen = [int(faces.nth(i).get_attribute("data-face-id")) for i in (0, 1)]
        faces.nth(0).click()
        faces.nth(1).focus()
        page.keyboard.press("Space")  # keyboard selection
        assert page.locator('.face[aria-pressed="true"]').count() == 2
        page.click("#split-btn")
        page.locator("#person-status").filter(has_text="Split into").wait_for()
        new = next(c for c in lib.list_clusters() if sorted(lib.get_cluster(c.cluster_id).face_ids) == sorted(chosen))
        assert new.cluster_id != first.cluster_id
        page.screenshot(path=shots / "13_split.png", full_page=True)

        page.locator(".face").first.click()  # one face selected
        page.click("#search-face-btn")  # search with a catalog face, from the people page
        page.wait_for_url(base + "/")
        page.locator(".card").first.wait_for()
        page.screenshot(path=shots / "14_search_with_face.png", full_page=True)
        page.go_back()
        page.wait_for_url("**/people**")
        page.locator("#back").wait_for()
        page.click("#back")
        page.fill("#q", "grace")
        page.click("#filter-form button")
        page.locator("a.person").first.wait_for()
        expect(page.locator("a.person")).to_have_count(1)  # polled from here: the page's CSP forbids eval
        assert page.locator("a.person").first.get_attribute("data-cluster-id") == str(first.cluster_id)
        page.screenshot(path=shots / "15_found.png", full_page=True)
        log = AuditLog(data_dir / "audit" / "people.jsonl").tail()
        assert [(e["actor"], e["action"]) for e in reversed(log)] == [("grace", "rename"), ("grace", "merge"),
                                                                      ("grace", "split")]
