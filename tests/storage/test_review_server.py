"""The review server on a hand-made release: its queue, its refusals (paths outside the release,
links, writes without the page's token or from another origin, unknown boxes), and the page in
headless Chromium judged with the keyboard and the mouse, the store read back afterwards."""

from __future__ import annotations

import io
import json
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxr_miner.storage.releases.release import BOXES_FILE, release_rows
from cxr_miner.storage.releases.review_server import ReviewApp, review_server
from cxr_miner.storage.releases.reviews import REVIEWS_FILE, ReviewStore
from cxr_miner.storage.stages.harvest import PART_SCHEMA

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
VERSION = "20261205T000000Z"
SIZES = {"e0.png": (400, 200), "e1.png": (400, 200), "m0.png": (300, 300)}


def _box(image, finding, rank, xyxy, confidence=None, score=0.5):
    x0, y0, x1, y1 = xyxy
    return {
        "image_id": image, "finding": finding, "rank": rank, "rule_rank": rank,
        "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1, "score": score, "probability": 0.9,
        "confidence": confidence, "at_operating_point": False, "method": "am", "model_id": "t@abc",
    }  # fmt: skip


BOXES = [
    _box("e0.png", "Edema", 1, (40, 20, 200, 120), score=0.9),
    _box("e0.png", "Edema", 2, (220, 40, 380, 180), score=0.4),
    _box("e1.png", "Edema", 1, (10, 10, 100, 100), score=0.7),
    _box("m0.png", "Mass", 1, (100, 100, 160, 150), confidence=0.8),
]


@pytest.fixture
def review(tmp_path):
    """A release of 4 boxes (Edema without confidence, Mass with), its images, and a server on a
    free port: yields (app, base URL)."""
    root = tmp_path / "root"
    root.mkdir()
    for name, (width, height) in SIZES.items():
        ramp = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
        Image.fromarray(ramp).save(root / name)
    images = pa.table(
        {
            "image_id": list(SIZES),
            "patient_id": ["1", "1", "2"],
            "split": ["train"] * 3,
            "source_path": list(SIZES),
            "width": pa.array([w for w, _ in SIZES.values()], pa.int32()),
            "height": pa.array([h for _, h in SIZES.values()], pa.int32()),
        }
    )
    release = tmp_path / "releases" / VERSION
    (release / "report").mkdir(parents=True)
    pq.write_table(release_rows(pa.Table.from_pylist(BOXES, schema=PART_SCHEMA), images), release / BOXES_FILE)
    (release / "report" / "index.html").write_text("<title>report</title>")
    (tmp_path / "secret.txt").write_text("not for reviewers")
    (release / "report" / "leak.html").symlink_to(tmp_path / "secret.txt")
    app = ReviewApp(release, root, {name: name for name in SIZES}, tmp_path / REVIEWS_FILE, reviewer="")
    server = review_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield app, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


def _status(url, data=None, headers=None):
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _post(base, path, body, token, **headers):
    all_headers = {"Content-Type": "application/json", **({"X-Review-Token": token} if token else {}), **headers}
    return _status(base + path, json.dumps(body).encode(), all_headers)


def test_the_queue_puts_findings_without_confidence_first_and_skips_judged_boxes(review):
    app, base = review
    state = json.loads(_get(base + "/api/state")[1])
    assert [(f["finding"], f["boxes"], f["has_confidence"]) for f in state["findings"]] == [
        ("Edema", 3, False),
        ("Mass", 1, True),
    ]
    assert state["sampler"].startswith("stratified by confidence")
    first = json.loads(_get(base + "/api/next?finding=Edema&reviewer=ann")[1])
    assert first["image_url"] == f"/image/{first['box_id']}" and first["finding"] == "Edema"
    status, png = _get(base + first["image_url"])
    assert status == 200 and Image.open(io.BytesIO(png)).size == SIZES[first["image_id"]]
    assert (
        _post(base, "/api/verdict", {"box_id": first["box_id"], "verdict": "skip", "reviewer": "ann"}, app.token)[0]
        == 200
    )
    after_skip = json.loads(_get(base + "/api/next?finding=Edema&reviewer=ann")[1])
    assert after_skip["box_id"] != first["box_id"]  # ann skipped it; bob is still offered it
    assert json.loads(_get(base + "/api/next?finding=Edema&reviewer=bob")[1])["box_id"] == first["box_id"]


def test_paths_outside_the_release_and_links_are_refused(review):
    _, base = review
    assert _get(base + "/release/report/index.html") == (200, b"<title>report</title>")
    for path in (
        "/release/../secret.txt",
        "/release/%2e%2e/secret.txt",
        "/release/report/leak.html",
        "/release//etc/passwd",
    ):
        status, body = _status(base + path)
        assert status == 403 and "secret" not in json.dumps(body).replace("secret.txt", ""), (path, status, body)
    assert _status(base + "/release/report/none.html")[0] == 404


def test_writes_need_the_pages_token_and_origin_and_a_known_box(review, tmp_path):
    app, base = review
    box_id = json.loads(_get(base + "/api/next?finding=Mass&reviewer=ann")[1])["box_id"]
    accept = {"box_id": box_id, "verdict": "accept", "reviewer": "ann"}
    assert _post(base, "/api/verdict", accept, None)[0] == 403
    assert _post(base, "/api/verdict", accept, "wrong-token")[0] == 403
    assert _post(base, "/api/verdict", accept, app.token, Origin="http://evil.example")[0] == 403
    status, body = _post(base, "/api/verdict", {**accept, "box_id": "0123456789abcdef"}, app.token)
    assert status == 400 and "no box '0123456789abcdef' in this release" in body["error"]
    status, body = _post(base, "/api/verdict", {**accept, "verdict": "redraw", "box": [0, 0, 900, 10]}, app.token)
    assert status == 400 and "not a box with area inside the 300 x 300 image m0.png" in body["error"]
    with ReviewStore(tmp_path / REVIEWS_FILE) as store:
        assert store.rows().num_rows == 0
    assert _post(base, "/api/verdict", accept, app.token, Origin=base)[0] == 200
    with ReviewStore(tmp_path / REVIEWS_FILE) as store:
        assert [(r["box_id"], r["verdict"]) for r in store.current()] == [(box_id, "accept")]


@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CXR_MINER_REQUIRE_BROWSER"),
    reason="Debian's chromium and chromium-driver are not installed (make test installs them)",
)
def test_a_reviewer_judges_with_keys_and_mouse_and_the_store_holds_exactly_that(review, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app, base = review
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    wait = WebDriverWait(driver, 20)

    def shown() -> str:
        return driver.execute_script("return document.body.dataset.box || ''")

    def next_after(previous: str) -> str:
        wait.until(lambda d: shown() != previous)
        return shown()

    try:
        driver.set_window_size(1200, 1000)
        driver.get(base + "/")
        name = driver.find_element(By.ID, "reviewer")
        name.send_keys("ann\n")
        body = driver.find_element(By.TAG_NAME, "body")
        first = next_after("")
        body.send_keys("a")
        second = next_after(first)
        body.send_keys("r")
        third = next_after(second)
        image = driver.find_element(By.ID, "image")
        rect = driver.execute_script("return arguments[0].getBoundingClientRect().toJSON()", image)
        actions = ActionChains(driver)
        actions.w3c_actions.pointer_action.move_to_location(int(rect["left"]) + 20, int(rect["top"]) + 30)
        actions.w3c_actions.pointer_action.pointer_down()
        actions.w3c_actions.pointer_action.move_to_location(int(rect["left"]) + 120, int(rect["top"]) + 90)
        actions.w3c_actions.pointer_action.pointer_up()
        actions.perform()
        body.send_keys("d")
        wait.until(lambda d: "every box is judged" in d.find_element(By.ID, "about").text)
        driver.find_element(By.CSS_SELECTOR, "[data-finding='Mass']").click()
        mass = next_after("")
        driver.find_element(By.CSS_SELECTOR, "[data-verdict='accept']").click()
        wait.until(
            lambda d: (
                "every box is judged" in d.find_element(By.ID, "about").text
                and "Mass" in d.find_element(By.ID, "about").text
            )
        )
        body.send_keys("u")
        wait.until(lambda d: "undone: accept" in d.find_element(By.ID, "status").text)
        scale = app.details[third]["image_width"] / rect["width"]
        # another reviewer's verdict shows in this page's counts by the next poll
        with ReviewStore(tmp_path / REVIEWS_FILE) as store:
            store.record(VERSION, app.boxes, mass, "reject", "bob")
        wait.until(lambda d: "Mass: 1/1 (a 0, r 1" in d.find_element(By.ID, "findings").text)
    finally:
        driver.quit()
    with ReviewStore(tmp_path / REVIEWS_FILE) as store:
        now = {row["box_id"]: row for row in store.current(VERSION)}
        history = store.rows().to_pylist()
    assert {b: (r["verdict"], r["reviewer"]) for b, r in now.items()} == {
        first: ("accept", "ann"), second: ("reject", "ann"), third: ("redraw", "ann"), mass: ("reject", "bob"),
    }  # fmt: skip
    drawn = [now[third][k] for k in ("x_min", "y_min", "x_max", "y_max")]
    np.testing.assert_allclose(drawn, [20 * scale, 30 * scale, 120 * scale, 90 * scale], atol=scale + 0.5)
    assert [(r["box_id"], r["verdict"], r["undone"]) for r in history if r["box_id"] == mass] == [
        (mass, "accept", True),
        (mass, "reject", False),
    ]
    assert len({first, second, third}) == 3 and {app.details[b]["finding"] for b in (first, second, third)} == {"Edema"}
