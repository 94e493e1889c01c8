"""The review pages in a real browser: the system's chromium (Playwright) against a real uvicorn server.

Flows: log in, search, choose another face of the query photo, vote, undo, more results, reload
and see the votes again; the people page: find by name, rename, pick the other person (never parsed
from the text), merge and split after a confirmation showing both sides, undo from the page, late
answers that must not land on another person; focus, roles and a 390 px wide screen. Screenshots of
each step are kept as test artifacts in ``build/screenshots/<test>/`` (printed with ``-s``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect

from face_assets.auth import TokenStore
from face_assets.web import create_app

from test_web import open_library, two_face_photo, uvicorn_server

pytestmark = pytest.mark.browser

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
def shots(request) -> Path:
    """The test's screenshot folder, kept after the run (a CI job uploads ``build/screenshots``)."""
    folder = Path(__file__).resolve().parents[1] / "build" / "screenshots" / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"\nscreenshots: {folder}")
    return folder


def wait_until(page, expression: str, timeout_s: float = 10.0) -> None:
    """Wait until ``expression`` is true in the page. Playwright's ``wait_for_function`` compiles
    its predicate with ``eval`` inside the page, which the service's CSP (no 'unsafe-eval')
    refuses in Chrome's own builds; ``evaluate`` goes through the debugging protocol instead."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not true after {timeout_s} s: {expression}"
        page.wait_for_timeout(50)


def log_in(page, base: str, token: str) -> None:
    page.goto(base + "/")
    page.wait_for_url("**/login")
    page.fill("#token", token)
    page.click("#login-btn")
    page.wait_for_url(base + "/")
    page.locator("#who span").wait_for()  # the header fills in after /api/me answers


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
        expect(boxes).to_have_count(2)  # drawn once the query image has loaded, after the results
        assert page.locator(".box.chosen").count() == 1
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
        expect(page.locator(".box")).to_have_count(2)
        assert page.locator(".card").count() == shown
        page.screenshot(path=shots / "05_after_reload.png", full_page=True)
        assert page.locator(f'.card[data-face-id="{up_id}"] button[aria-pressed="true"]').count() == 0


@pytest.fixture()
def served(data_dir) -> Iterator[tuple]:
    """A clustered library served on loopback, and a reviewer's and a viewer's token."""
    store = TokenStore(data_dir / "auth" / "tokens.json")
    reviewer, viewer = store.create("grace", "reviewer")[1], store.create("vic", "viewer")[1]
    with open_library(data_dir) as lib, uvicorn_server(create_app(lib)) as base:
        lib.cluster()
        assert len(lib.list_clusters()) >= 4
        yield lib, base, reviewer, viewer


def open_person(page, base: str, cluster_id: int) -> None:
    page.goto(f"{base}/people#person/{cluster_id}")
    page.locator(".face").first.wait_for()
    expect(page.locator("#person-status")).not_to_have_text("Loading…")


def pick(page, text: str, cluster_id: int) -> None:
    """Type ``text`` in the other-person box and pick person ``cluster_id`` from the suggestions."""
    page.fill("#target-q", text)
    page.locator(f'.suggestion[data-cluster-id="{cluster_id}"]').click()
    expect(page.locator("#chosen")).to_have_attribute("data-cluster-id", str(cluster_id))


def test_people_pick_confirm_merge_split_undo(browser, served, shots):
    lib, base, token, _ = served
    persons = lib.list_clusters()
    first, second, third = persons[0], persons[1], persons[2]
    team = f"Team {second.cluster_id}"  # a name that ends in a number which is another person's id
    lib.rename(third.cluster_id, team)
    second_faces = lib.get_cluster(second.cluster_id).face_ids
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    log_in(page, base, token)
    page.click("text=People")
    page.locator("a.person").nth(len(persons) - 1).wait_for()
    card = page.locator(f'a.person[data-cluster-id="{third.cluster_id}"]')
    assert card.get_attribute("aria-label") == f"{team}, {third.size} faces"  # what a screen reader reads
    page.screenshot(path=shots / "01_people.png", full_page=True)

    page.click(f'a.person[data-cluster-id="{first.cluster_id}"]')
    page.locator(".face").first.wait_for()
    assert page.evaluate("document.activeElement.id") == "person-title"  # focus on the opened person
    page.fill("#name", "Grace Hopper")
    page.click("#rename-btn")
    page.locator("#person-status").filter(has_text="Renamed to Grace Hopper").wait_for()
    assert lib.get_cluster(first.cluster_id).label == "Grace Hopper"
    assert "Grace Hopper" in page.locator("#person-title").inner_text()

    # the exact name "Team N" picks that person, never person #N
    page.fill("#target-q", team.lower())
    page.press("#target-q", "Enter")
    expect(page.locator("#chosen")).to_have_attribute("data-cluster-id", str(third.cluster_id))
    page.click("#merge-btn")
    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible()
    assert "Grace Hopper" in page.locator("#side-a").inner_text() and f"{first.size} faces" in page.locator(
        "#side-a").inner_text()
    assert team in page.locator("#side-b").inner_text() and f"#{third.cluster_id}" in page.locator(
        "#side-b").inner_text()
    assert page.locator("#side-a img.thumb").count() == 1 and page.locator("#side-b img.thumb").count() == 1
    assert f"{first.size + third.size} faces" in page.locator("#confirm-result").inner_text()
    page.screenshot(path=shots / "02_confirm_merge.png")
    page.click("#confirm-cancel")  # cancelled: nothing changes
    expect(dialog).to_be_hidden()
    assert lib.get_cluster(third.cluster_id).size == third.size and not lib.curation_log(limit=10)[0]["action"] == "merge"

    pick(page, f"#{second.cluster_id}", second.cluster_id)  # an unnamed person, found by its id and picked
    page.click("#merge-btn")
    page.click("#confirm-ok")
    page.locator("#person-status").filter(has_text="Merged").wait_for()
    merged = lib.get_cluster(first.cluster_id)
    assert merged.size == first.size + second.size and merged.label == "Grace Hopper"
    page.screenshot(path=shots / "03_merged.png", full_page=True)

    # undo from the page: both persons back as they were
    page.locator("#person-status button", has_text="Undo").click()
    page.locator("#person-status").filter(has_text="undone").wait_for()
    assert lib.get_cluster(second.cluster_id).face_ids == second_faces
    assert lib.get_cluster(first.cluster_id).size == first.size and lib.get_cluster(second.cluster_id).size == second.size
    page.locator("#changes li").first.filter(has_text="undid change").wait_for()
    page.screenshot(path=shots / "04_undone.png", full_page=True)

    # split: the selected faces become the new person; this one keeps its name and the other faces
    faces = page.locator(".face")
    chosen = [int(faces.nth(i).get_attribute("data-face-id")) for i in range(first.size - 1)]
    for i in range(first.size - 1):
        faces.nth(i).click()
    faces.nth(0).focus()
    page.keyboard.press("Space")  # keyboard: unselect, then select again
    page.keyboard.press("Space")
    assert page.locator('.face[aria-pressed="true"]').count() == len(chosen)
    page.click("#split-btn")
    assert f"{len(chosen)} faces" in page.locator("#side-a").inner_text()
    assert "New person" in page.locator("#side-b").inner_text() and "no name" in page.locator("#side-b").inner_text()
    page.screenshot(path=shots / "05_confirm_split.png")
    page.click("#confirm-ok")
    page.locator("#person-status").filter(has_text="now a new person").wait_for()
    new = next(c for c in lib.list_clusters() if sorted(lib.get_cluster(c.cluster_id).face_ids) == sorted(chosen))
    assert new.cluster_id != first.cluster_id and new.label is None
    assert lib.get_cluster(first.cluster_id).label == "Grace Hopper" and lib.get_cluster(first.cluster_id).size == 1
    assert page.url.endswith(f"#person/{new.cluster_id}")  # the page shows the new person
    page.screenshot(path=shots / "06_split.png", full_page=True)
    assert [e["action"] for e in lib.curation_log(limit=10)][:5] == ["split", "undo", "merge", "rename", "rename"]
    assert {e["actor"] for e in lib.curation_log(limit=4)} == {"grace"}


def test_moves_and_late_answers_never_land_on_another_person(browser, served, shots):
    lib, base, token, _ = served
    a, b, c, d = lib.list_clusters()[:4]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    log_in(page, base, token)

    # a rename cannot be sent while the next person loads: the form waits for it
    held = []
    page.route(f"**/api/people/{b.cluster_id}?*", lambda route: held.append(route))
    open_person(page, base, a.cluster_id)
    page.fill("#target-q", "x")
    page.evaluate(f"location.hash = '#person/{b.cluster_id}'")
    expect(page.locator("#person-status")).to_have_text("Loading…")
    assert page.locator("#rename-btn").is_disabled() and page.locator("#name").is_disabled()
    assert page.locator("#target-q").input_value() == ""  # the other person box does not carry over
    page.screenshot(path=shots / "01_loading.png")
    while not held:
        page.wait_for_timeout(50)
    held[0].continue_()
    page.unroute(f"**/api/people/{b.cluster_id}?*")
    expect(page.locator("#rename-btn")).to_be_enabled()
    page.fill("#name", "Bea")
    page.click("#rename-btn")
    page.locator("#person-status").filter(has_text="Renamed to Bea").wait_for()
    assert lib.get_cluster(b.cluster_id).label == "Bea" and lib.get_cluster(a.cluster_id).label is None

    # a late merge answer: the user opened another person meanwhile and stays there
    held.clear()
    page.route("**/api/people/merge", lambda route: held.append(route))
    pick(page, f"#{c.cluster_id}", c.cluster_id)
    page.click("#merge-btn")
    page.click("#confirm-ok")
    while not held:
        page.wait_for_timeout(50)
    open_person(page, base, d.cluster_id)
    held[0].continue_()
    page.locator("#person-status").filter(has_text="Merged").wait_for()
    assert page.url.endswith(f"#person/{d.cluster_id}") and page.locator(".face").count() == d.size
    assert lib.get_cluster(max(b, c, key=lambda p: (p.size, -p.cluster_id)).cluster_id).size == b.size + c.size
    page.unroute("**/api/people/merge")

    # moving every face out: the page goes to the person that received them
    open_person(page, base, d.cluster_id)
    pick(page, f"#{a.cluster_id}", a.cluster_id)
    for i in range(d.size):
        page.locator(".face").nth(i).click()
    page.click("#move-btn")
    assert f"{d.size} face" in page.locator("#side-a").inner_text() and "goes away" in page.locator(
        "#confirm-result").inner_text()
    page.screenshot(path=shots / "02_confirm_move.png")
    page.click("#confirm-ok")
    page.locator("#person-status").filter(has_text="is gone").wait_for()
    assert page.url.endswith(f"#person/{a.cluster_id}") and page.locator(".face").count() == a.size + d.size
    last = lib.curation_log(limit=2)  # the faces moved in one request, one change
    assert last[0]["action"] == "move" and len(last[0]["face_ids"]) == d.size and last[1]["action"] == "merge"
    assert "no such person" not in page.content()
    page.screenshot(path=shots / "03_moved_all.png", full_page=True)
    page.goto(f"{base}/people#person/{d.cluster_id}")  # the emptied person: said so, with its history
    page.locator("#person-status").filter(has_text="no longer exists").wait_for()
    page.locator("#changes li button.undo").first.click()  # undo the move from its history
    page.locator(".face").first.wait_for()
    assert page.url.endswith(f"#person/{d.cluster_id}") and lib.get_cluster(d.cluster_id).size == d.size
    page.screenshot(path=shots / "04_move_undone.png", full_page=True)


def test_focus_roles_and_a_narrow_screen(browser, served, feedback_people, shots):
    lib, base, reviewer, viewer = served
    photo = next(iter(feedback_people.values()))[0]
    page = browser.new_page(viewport={"width": 390, "height": 844})
    log_in(page, base, viewer)
    assert not page.locator("#query-section").is_visible()  # a fresh page shows no broken "Your photo"
    width = "Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)"
    assert page.evaluate(width) <= 390  # nothing overflows: no sideways scrolling
    page.screenshot(path=shots / "01_search_390.png", full_page=True)
    page.set_input_files("#file", str(photo))
    page.click("#search-btn")
    page.locator(".card").first.wait_for()
    assert page.evaluate("document.activeElement.id") == "results-title"  # focus moves to the results
    assert page.locator(".votes").count() == 0  # a viewer is not offered votes that would fail
    link = page.locator(".card a.name").first
    badge = page.locator(".card .badge").first.bounding_box()
    assert badge["height"] < 30 and badge["width"] < 120  # the match badge stays a badge
    wait_until(page, "document.getElementById('query-img').naturalWidth > 0")
    assert page.evaluate(width) <= 390
    page.screenshot(path=shots / "02_results_390.png", full_page=True)
    target = link.get_attribute("href")
    link.click()  # a result links to its person
    page.locator(".face").first.wait_for()
    assert page.url.endswith(target.split("/people")[1]) and page.evaluate("document.activeElement.id") == "person-title"
    assert not page.locator("#rename-form").is_visible() and not page.locator(".toolbar").is_visible()
    assert not page.locator("#changes-view").is_visible()
    assert page.evaluate(width) <= 390
    page.screenshot(path=shots / "03_person_viewer_390.png", full_page=True)

    page = browser.new_page(viewport={"width": 390, "height": 844})
    log_in(page, base, reviewer)
    open_person(page, base, lib.list_clusters()[0].cluster_id)
    assert page.locator("#rename-form").is_visible() and page.locator("#merge-btn").is_visible()
    assert page.evaluate(width) <= 390
    page.locator(".face").first.click()
    pick(page, f"#{lib.list_clusters()[1].cluster_id}", lib.list_clusters()[1].cluster_id)
    page.click("#move-btn")
    box = page.locator("#confirm").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390  # the confirmation fits the screen
    page.screenshot(path=shots / "04_confirm_390.png")
    page.keyboard.press("Escape")
    expect(page.locator("#confirm")).to_be_hidden()
    page.goto(base + "/people")
    page.locator("a.person").first.wait_for()
    assert page.evaluate(width) <= 390
    page.screenshot(path=shots / "05_people_390.png", full_page=True)
