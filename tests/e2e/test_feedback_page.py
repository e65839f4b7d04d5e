"""The labellers' page in a real browser (headless Chromium from Debian, driven by Selenium) on a
running job: learner, buffer, scorer, generator and feedback service as processes on loopback.

A labeller logs in with their token, rollouts stream onto the page, a click and a keyboard
shortcut each store a label (checked in the SQLite database), H-hat's version advances and the
scorer starts shaping rewards with it; a request without a labeller and a cross-site form POST
(from a page served on another port, which the browser sends with the session cookie) are
refused and store nothing. The test saves a screenshot of the page (``$STREAMRL_SCREENSHOT``,
when set, receives a copy: the picture of docs/feedback.md is made this way).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import sqlite3
import threading
import time

import pytest
import requests

from streamrl.testing import (
    add_labeller,
    answers,
    feedback_sections,
    local_run_config,
    scrape,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SHOWN = 4
"""Cards the page shows in the keyboard check (``?shown=4``): the list turns over within a few polls."""


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,1500",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def attacker_site(target: str, rollout_id: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A page on another origin (same host, another port: same-site, so the browser attaches the
    session cookie) that submits a form to the feedback API as soon as it loads."""
    body = json.dumps({"rollout_id": rollout_id, "value": -1, "x": ""})[:-2]  # `"x": "` + `=...` closes the JSON
    page = f"""<!doctype html><html><body>
<form id="f" method="POST" action="{target}api/ratings" enctype="text/plain">
<input type="hidden" name='{body}' value='"}}'></form>
<script>document.getElementById("f").submit();</script></body></html>""".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/"


def forged(samples: dict) -> float:
    """Requests the feedback service refused as forged (no CSRF token, or another origin)."""
    return sum(
        samples.get(f"streamrl_feedback_requests_refused_total{{reason={r}}}", 0) for r in ("csrf", "cross_origin")
    )


def start_job(tmp_path, tiny_model_dir, services, **feedback):
    """Learner, buffer, scorer, generator and feedback service (reward shaping) on loopback, once the page
    answers, and a labeller alice; returns ``(sections, procs, page url, database, alice's token)``."""
    sections = feedback_sections(
        local_run_config(tmp_path, tiny_model_dir, learner={"total_steps": 100000}),
        combination="reward_shaping",
        min_labels=2,
        **feedback,
    )
    config = write_config(tmp_path / "run.toml", sections)
    procs = services(config)
    for name in ("learner", "buffer", "scorer", "generator", "feedback"):
        procs.start(name)
    url = f"http://127.0.0.1:{sections['feedback']['http_port']}/"

    # the bound only ends a hang: at load average 12-16 on 2 cores a feedback service took > 300 s to start
    assert wait_until(lambda: answers(url + "healthz"), timeout=900), procs.logs()
    return sections, procs, url, tmp_path / "run" / "feedback" / "labels.sqlite3", add_labeller(config, "alice")


def labels(db) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT labeller, kind, rollout_id, value, policy_version FROM labels ORDER BY id"
        ).fetchall()


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (make chromium; `make test` installs them)",
)
def test_labels_from_a_real_browser_reach_the_database_and_hhat(tmp_path, tiny_model_dir, services):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    sections, procs, url, db, token = start_job(tmp_path, tiny_model_dir, services, fit_interval_s=0.2)

    def streaming() -> bool:
        try:
            got = requests.get(url + "api/rollouts", headers={"Authorization": f"Bearer {token}"}, timeout=2)
            return got.ok and len(got.json()["rollouts"]) >= 4
        except requests.RequestException:
            return False

    assert wait_until(streaming, timeout=900), procs.logs()
    # no labeller: refused
    assert requests.get(url + "api/rollouts", timeout=5).status_code == 401
    assert requests.post(url + "api/ratings", json={"rollout_id": "x", "value": 1}, timeout=5).status_code == 401

    def shown_ids(d) -> list[str]:
        """The rollout ids on the page, top first (read in one script: the list may turn over meanwhile)."""
        return d.execute_script(
            "return Array.from(document.querySelectorAll('#rollouts li.rollout'), li => li.dataset.id)"
        )

    def click_a_card(selector: str, skip: str | None = None):
        """Click ``selector`` in the first card on the page other than ``skip``'s; returns that card. Waited
        for: a card that left the list between finding and clicking it is stale, and another is tried."""

        def click(d):
            card = next(
                c
                for c in d.find_elements(By.CSS_SELECTOR, "#rollouts li.rollout")
                if c.get_attribute("data-id") != skip
            )
            card.find_element(By.CSS_SELECTOR, selector).click()
            return card

        return WebDriverWait(driver, 60, ignored_exceptions=[StaleElementReferenceException]).until(click)

    driver = browser()
    try:
        wait = WebDriverWait(driver, 240)
        driver.get(url + f"?shown={SHOWN}")  # a short list: it turns over within a few polls
        wait.until(ec.visibility_of_element_located((By.ID, "token"))).send_keys(token + Keys.ENTER)
        wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#rollouts li.rollout")))
        wait.until(lambda d: len(shown_ids(d)) == SHOWN)
        assert driver.find_element(By.ID, "who").text == "labeller: alice"

        # a click
        clicked_id = click_a_card("button.rate-up").get_attribute("data-id")  # the card is selected: pinned
        wait.until(lambda d: "label #" in d.find_element(By.CSS_SELECTOR, f'li[data-id="{clicked_id}"] .verdict').text)
        # a keyboard shortcut on another card: select it, let the list turn over past it, then "-". The
        # selected card is pinned: the same element stays on the page, selected, while every card that was
        # around it leaves (it once stayed at its position and "-" rated another card; later it left the
        # list when SHOWN newer rollouts arrived, as a page catching up on its first polls gets 50 at once)
        around = set(shown_ids(driver))
        second = click_a_card(".completion", skip=clicked_id)
        keyed_id = second.get_attribute("data-id")
        around |= set(shown_ids(driver))
        wait.until(lambda d: not (set(shown_ids(d)) & around) - {keyed_id})
        assert keyed_id in shown_ids(driver) and len(shown_ids(driver)) == SHOWN
        assert "selected" in second.get_attribute("class")  # the same element: not rebuilt (else: stale)
        driver.find_element(By.TAG_NAME, "body").send_keys("-")
        wait.until(lambda d: "label #" in second.find_element(By.CSS_SELECTOR, ".verdict").text)
        stored = labels(db)
        assert [(who, kind, rid, value) for who, kind, rid, value, _ in stored] == [
            ("alice", "rating", clicked_id, 1),
            ("alice", "rating", keyed_id, -1),
        ]
        assert all(version >= 0 for *_, version in stored)

        # H-hat's version advances (min_labels = 2) and the page shows it
        wait.until(lambda d: int(d.find_element(By.ID, "model-version").text) >= 1)
        status = requests.get(url + "api/status", headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
        assert status["human_model_version"] >= 1 and status["labels"]["total"] == 2
        # ... and the scorer shapes rewards with it
        scorer_port = sections["metrics"]["scorer_port"]
        assert wait_until(lambda: scrape(scorer_port).get("streamrl_scorer_human_scored_total", 0) > 0, 60), (
            procs.logs()
        )
        assert scrape(scorer_port)["streamrl_scorer_human_model_version"] >= 1

        driver.get(url)  # the whole list for the screenshot (the session cookie logs in again)
        wait.until(lambda d: len(shown_ids(d)) >= 3)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#reward-chart polyline"))
        screenshot = tmp_path / "feedback-page.png"
        driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
        if os.environ.get("STREAMRL_SCREENSHOT"):
            shutil.copy(screenshot, os.environ["STREAMRL_SCREENSHOT"])

        # a cross-site form POST rides on the session cookie but carries no CSRF token: refused
        feedback_port = sections["metrics"]["feedback_port"]
        refused_before = forged(scrape(feedback_port))
        server, attacker = attacker_site(url, clicked_id)
        try:
            driver.get(attacker)
            wait.until(lambda d: d.current_url.startswith(url))  # the form was submitted to us
            assert "403" in driver.page_source or "refused" in driver.page_source
        finally:
            server.shutdown()
        refused_after = forged(scrape(feedback_port))
        assert refused_after == refused_before + 1, (driver.page_source, scrape(feedback_port))
        assert len(labels(db)) == 2  # nothing stored
    finally:
        driver.quit()


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (make chromium; `make test` installs them)",
)
def test_a_labeller_labels_20_chosen_rollouts_in_a_row_while_the_stream_runs(tmp_path, tiny_model_dir, services):
    """Hold stops the list turning over, so 20 cards clicked one after another are the 20 labelled
    (no stale element, no card shifting under the pointer); the queue then offers the oldest rollout
    still unlabelled, and a held-down key (auto-repeat) labels once."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    _, _, url, db, token = start_job(
        tmp_path, tiny_model_dir, services, fit_interval_s=0.5, label_rate_per_s=50.0, label_burst=50
    )
    driver = browser()
    try:
        wait = WebDriverWait(driver, 240)
        driver.get(url)
        wait.until(ec.visibility_of_element_located((By.ID, "token"))).send_keys(token + Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rollouts li.rollout")) >= 24)
        driver.find_element(By.ID, "hold").click()
        assert driver.find_element(By.ID, "stream-state").text == "held"
        cards = driver.find_elements(By.CSS_SELECTOR, "#rollouts li.rollout")[:20]
        chosen = [card.get_attribute("data-id") for card in cards]
        for i, card in enumerate(cards):  # the same element objects throughout: none may go stale
            card.find_element(By.CSS_SELECTOR, "button.rate-up" if i % 2 == 0 else "button.rate-down").click()
            wait.until(lambda d, card=card: "label #" in card.find_element(By.CSS_SELECTOR, ".verdict").text)
        # while held, new rollouts keep arriving but wait
        wait.until(lambda d: "waiting" in d.find_element(By.ID, "held-count").text)
        assert [
            c.get_attribute("data-id") for c in driver.find_elements(By.CSS_SELECTOR, "#rollouts li.rollout")[:20]
        ] == chosen
        stored = labels(db)
        assert [(rid, value) for _, _, rid, value, _ in stored] == [
            (rid, 1 if i % 2 == 0 else -1) for i, rid in enumerate(chosen)
        ]
        driver.find_element(By.ID, "resume").click()
        assert driver.find_element(By.ID, "stream-state").text == "live"

        # the queue: the oldest rollout not yet labelled; labelling it moves to the next
        head = driver.find_element(By.ID, "queue-card").get_attribute("data-id")
        assert head not in chosen
        driver.find_element(By.ID, "queue-up").click()
        wait.until(lambda d: len(labels(db)) == 21)
        assert labels(db)[-1][2] == head
        assert driver.find_element(By.ID, "queue-card").get_attribute("data-id") != head

        # a held key sends repeated keydowns marked `repeat`: only the first labels
        following = driver.find_element(By.ID, "queue-card").get_attribute("data-id")
        driver.execute_script("""
            for (const repeat of [false, true, true, true])
              document.dispatchEvent(new KeyboardEvent("keydown", {key: "D", repeat, bubbles: true}));""")
        wait.until(lambda d: len(labels(db)) == 22)
        time.sleep(2)
        assert len(labels(db)) == 22 and labels(db)[-1][2:4] == (following, -1)

        # beta_t is shown (beta 1, decay 0.99 at the newest policy version); it only falls while the learner
        # publishes versions, and the page polls: once the page shows at most the service's value read first,
        # what it shows lies between that and the value read after it (0.01: the page's rounding)
        def beta_t() -> float:
            headers = {"Authorization": f"Bearer {token}"}
            return requests.get(url + "api/status", headers=headers, timeout=5).json()["beta_t"]

        before = beta_t()
        wait.until(lambda d: float(d.find_element(By.ID, "beta-t").text) <= before + 0.01)
        shown = float(driver.find_element(By.ID, "beta-t").text)
        after = beta_t()
        assert after - 0.01 <= shown <= before + 0.01 <= 1.01, (after, shown, before)
    finally:
        driver.quit()
