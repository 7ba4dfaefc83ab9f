"""The labeling page (GET /review) in headless Chromium against a real `bentoml serve`: a reviewer
labels with the keyboard alone and the log holds exactly those labels; two reviewers at once never
see the same image; a missing or wrong token is asked for, clearly; undo reopens an answer; a
phone-width screen shows the whole desk.

One server for the module (CPU is scarce), its queue filled once from /predict. Each test signs in
as its own reviewer and reads back only the log rows that reviewer wrote, so the tests share the
queue without reading each other's answers.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from tests.service_server import published_model, serve, service_env  # noqa: F401
from tests.test_http_contract import CHROMIUM_ARGS, _chromium

TOKEN = "review-page-token-0123456789"
# The module leases about 80 items (each page takes batches of 10 and fetches the next one as soon as
# a batch is used up); the digits run has 90 images across its splits, all of them posted.
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def server(published_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review_page")
    env = service_env(published_model.registry, tmp / "data", api_token=TOKEN)
    with serve(env, tmp / "server.log") as running:
        running.data_dir = tmp / "data"
        posted = _fill_queue(running, published_model)
        _wait_for_logged(running.data_dir, posted)
        yield running


def _fill_queue(server, model) -> int:
    splits = json.loads((model.run_dir / "splits.json").read_text())
    # test and val hold 27 images, fewer than the tests lease; train's images are as good to review.
    paths = [Path(p) for split in ("test", "val", "train") for p in splits[split]]
    with server.client() as client:
        for start in range(0, len(paths), 30):
            chunk = paths[start:start + 30]
            files = [("images", (p.name, p.read_bytes(), "image/png")) for p in chunk]
            client.post("/predict", files=files).raise_for_status()
    return len(paths)


def _wait_for_logged(data_dir: Path, n: int, timeout_s: float = 60) -> None:
    """The log writer commits in the background: the queue fills from what is committed."""
    deadline = time.monotonic() + timeout_s
    logged = 0
    while time.monotonic() < deadline:
        if (data_dir / "predictions.sqlite3").exists():
            logged = _query(data_dir, "SELECT COUNT(*) FROM predictions WHERE image_stored = 1")[0][0]
            if logged >= n:
                return
        time.sleep(0.2)
    raise AssertionError(f"{logged} of {n} posted predictions reached the log in {timeout_s} s")


def _query(data_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    with sqlite3.connect(f"file:{data_dir / 'predictions.sqlite3'}?mode=ro", uri=True, timeout=30) as db:
        return db.execute(sql, params).fetchall()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    assert chromium, "the review page tests need Debian's chromium (apt-get install chromium)"
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def new_page(browser):
    """A fresh browser context per page (its own sessionStorage: its own reviewer)."""
    contexts = []

    def make(viewport: dict | None = None):
        context = browser.new_context(viewport=viewport or {"width": 1280, "height": 800})
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


def _open(page, server) -> None:
    page.goto(server.url + "/review", wait_until="domcontentloaded")
    page.wait_for_selector("body[data-view=signin]")


def _sign_in(page, server, reviewer: str, token: str | None = TOKEN) -> None:
    _open(page, server)
    page.fill("#reviewer", reviewer)
    if token is not None:
        page.fill("#token", token)
    page.press("#token", "Enter")


def _shown(page, other_than: str | None = None) -> str:
    """The prediction id of the item on screen once it is ready to answer (and not `other_than`).

    A key press returns once the page's handler ran, which marks the desk busy until the next item
    is on screen, so waiting for "not busy" after a press never reads the item just answered."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            """(previous) => {
                const image = document.querySelector('#image');
                const desk = document.querySelector('#desk');
                return document.body.dataset.view === 'desk' && !desk.dataset.busy && image.dataset.predictionId
                    && image.dataset.predictionId !== previous && image.naturalWidth > 0;
            }""", arg=other_than, timeout=30_000)
    except PlaywrightTimeout:
        says = page.evaluate("""() => [document.body.dataset.view, document.querySelector('#status').textContent,
                                       document.querySelector('#image-note').textContent,
                                       document.querySelector('#signin-problem').textContent]""")
        raise AssertionError(f"no item ready to answer after 30 s; the page (view, status, image, sign-in) says {says}") from None
    return page.locator("#image").get_attribute("data-prediction-id")


def _class_keys(page) -> dict[str, str]:
    """label -> the key its button says labels it."""
    return dict(page.locator("#classes button").evaluate_all("bs => bs.map(b => [b.dataset.label, b.dataset.key])"))


def _predicted(page) -> str:
    return page.locator("#classes button.predicted").get_attribute("data-label")


def _labeled_count(page, n: int) -> None:
    page.wait_for_function("(n) => document.querySelector('#count-labeled').textContent === String(n)", arg=n,
                           timeout=30_000)


def test_a_reviewer_labels_twenty_images_with_the_keyboard_alone_and_the_log_holds_exactly_those(
        server, new_page, published_model):
    page = new_page()
    _sign_in(page, server, "kim")
    pressed: dict[str, str] = {}
    current = _shown(page)
    for i in range(20):
        keys = _class_keys(page)
        assert set(keys) == set(published_model.classes)
        if i % 4 == 3:  # every fourth: accept the model's answer
            label, key = _predicted(page), "Enter"
        else:
            label = published_model.classes[i % len(published_model.classes)]
            key = keys[label]
        pressed[current] = label
        page.keyboard.press(key)
        _labeled_count(page, i + 1)
        if i < 19:
            current = _shown(page, other_than=current)

    labeled = dict(_query(server.data_dir, "SELECT prediction_id, feedback_label FROM predictions "
                                           "WHERE feedback_label IS NOT NULL"))
    events = _query(server.data_dir, "SELECT prediction_id, label, source, reviewer FROM feedback_events "
                                     "WHERE reviewer = 'kim'")
    assert len(pressed) == 20
    assert len(events) == 20, events  # one event per label: nothing sent twice, nothing sent for an item not shown
    assert {pid: label for pid, label, _, _ in events} == pressed
    assert {(source, reviewer) for _, _, source, reviewer in events} == {("review", "kim")}
    others = {pid for (pid,) in _query(server.data_dir, "SELECT prediction_id FROM feedback_events WHERE reviewer IS NOT 'kim'")}
    assert {pid: label for pid, label in labeled.items() if pid not in others} == pressed


def test_two_reviewers_working_at_once_never_see_the_same_image(server, new_page):
    pages = {"lea": new_page(), "max": new_page()}
    for reviewer, page in pages.items():  # both sign in before either is served: their leases race
        _open(page, server)
        page.fill("#reviewer", reviewer)
        page.fill("#token", TOKEN)
    for page in pages.values():
        page.press("#token", "Enter")
    seen: dict[str, list[str]] = {reviewer: [] for reviewer in pages}
    for _ in range(6):
        for reviewer, page in pages.items():  # interleaved, as two people at two desks
            # Not "a different id than before": an item shared by both leases may come back.
            seen[reviewer].append(_shown(page))
            page.keyboard.press("s")
    assert not set(seen["lea"]) & set(seen["max"]), seen
    for ids in seen.values():
        assert len(set(ids)) == 6, ids  # and each skip moved on to another image


def test_a_missing_token_is_asked_for_and_a_wrong_one_is_refused_clearly(server, new_page):
    page = new_page()
    _open(page, server)
    assert page.locator("#token").is_visible() and page.locator("label[for=token]").inner_text() == "API token"
    assert "API token" in page.locator("#signin-intro").inner_text()

    page.fill("#reviewer", "noa")
    page.press("#reviewer", "Enter")  # no token given
    problem = page.locator("#signin-problem")
    problem.wait_for(state="visible")
    assert problem.inner_text().startswith("This service needs a token (401): ")
    assert page.locator("#token").is_visible()

    page.fill("#token", "not-the-token")
    page.press("#token", "Enter")
    page.wait_for_function("() => document.querySelector('#signin-problem').textContent.startsWith('The token was refused')")
    assert problem.inner_text() == ("The token was refused (401): the bearer token given for /review/next is not valid. "
                                    "Enter it again.")
    assert page.evaluate("document.body.dataset.view") == "signin" and page.locator("#token").is_visible()
    assert page.locator("#reviewer").input_value() == "noa"  # only the token needs typing again

    page.fill("#token", TOKEN)
    page.press("#token", "Enter")
    assert _shown(page)


def test_undo_reopens_the_last_answer_and_a_new_label_replaces_it(server, new_page, published_model):
    page = new_page()
    _sign_in(page, server, "uma")
    item = _shown(page)
    keys = _class_keys(page)
    first, second = published_model.classes[0], published_model.classes[1]
    page.keyboard.press(keys[first])
    _labeled_count(page, 1)
    _shown(page, other_than=item)

    page.keyboard.press("u")
    assert _shown(page) == item
    assert page.locator("#previous").inner_text() == f"Its label in the log now: “{first}”."
    _labeled_count(page, 0)
    page.keyboard.press(keys[second])
    _labeled_count(page, 1)

    assert _query(server.data_dir, "SELECT feedback_label FROM predictions WHERE prediction_id = ?", (item,)) == [(second,)]
    events = _query(server.data_dir, "SELECT label, previous_label, source, reviewer FROM feedback_events "
                                     "WHERE prediction_id = ? ORDER BY id", (item,))
    assert events == [(first, None, "review", "uma"), (second, first, "review", "uma")]


def test_a_phone_width_shows_the_image_and_every_class_button_without_horizontal_scrolling(
        server, new_page, published_model):
    page = new_page(PHONE)
    _sign_in(page, server, "ivy")
    _shown(page)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page is {width} px wide on a {PHONE['width']} px screen"

    def inside_the_screen(box) -> bool:
        return (box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
                and box["y"] + box["height"] <= PHONE["height"])

    image = page.locator("#image").bounding_box()
    assert inside_the_screen(image) and image["width"] >= 0.8 * PHONE["width"], image
    buttons = page.locator("#classes button")
    assert buttons.count() == len(published_model.classes)
    for i in range(buttons.count()):
        box = buttons.nth(i).bounding_box()
        assert inside_the_screen(box), (buttons.nth(i).inner_text(), box)
        assert box["height"] >= 44, "a button a finger can hit is at least 44 px tall"
