"""The live dashboard in headless Chromium: a provider appears in the nodes table, a job's progress
goes to done, the charts render, and the token is taken from ?token= once.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package: skipped without
them, except under CI=true, where they must be installed. Set DCF_ARTIFACTS to a folder to keep
the screenshot.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import IN_CI
from user_client import Client
from user_client.local import LocalCluster

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        msg = f"headless browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver; " \
              "pip install selenium)"
        if IN_CI:
            pytest.fail(msg + " (CI=true: the dashboard test must run)")
        pytest.skip(msg)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1440,1500", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver: Any, pred: Any, timeout: float, what: str) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            got = pred()
        except StaleElementReferenceException:  # the table was redrawn under us
            got = None
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; page text:\n{driver.find_element('tag name', 'body').text}")


def js(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_dashboard_shows_nodes_and_job_progress(browser: Any, tmp_path: Path) -> None:
    with LocalCluster(0, heartbeat=0.5, threads=1, provider_args=["--delay", "1"]) as cl, Client(cl.url) as c:
        browser.get(cl.url + "/")
        wait_until(browser, lambda: js(browser, "return document.getElementById('conn').dataset.state") == "live",
                   20, "the stream to connect")
        assert browser.find_element("id", "nodes-empty").is_displayed()
        assert browser.find_element("id", "train-empty").text == "No training jobs yet."

        cl.add_provider()
        wait_until(browser, lambda: js(browser, """
            const row = document.querySelector('tr.node[data-name="local-0"]');
            return row && row.dataset.state === 'ready';"""), 60, "the provider in the nodes table")
        row_text = browser.find_element("css selector", 'tr.node[data-name="local-0"]').text
        assert "cpu" in row_text and "ready" in row_text and "s ago" in row_text

        rng = np.random.default_rng(0)
        job = c.submit_matmul(rng.standard_normal((400, 300)), rng.standard_normal((300, 200)))
        seen: list[tuple[str, str]] = []

        def job_state() -> bool:
            got = js(browser, f"""
                const row = document.querySelector('tr.job[data-job-id="{job}"]');
                return row ? [row.dataset.state, row.querySelector('.pct').textContent] : null;""")
            if got and (not seen or seen[-1] != tuple(got)):
                seen.append(tuple(got))
            return bool(got) and got[0] == "done"

        wait_until(browser, job_state, 60, "the job to show done")
        states = [s for s, _ in seen]
        assert "running" in states and states.index("running") < states.index("done"), seen
        done, total = seen[-1][1].split(" · ")[0].split(" ")[0].split("/")  # "400/400 rows": the head's unit
        assert seen[-1][0] == "done" and seen[-1][1].endswith(" · 100%") and done == total, seen
        assert js(browser, f"""return document.querySelector('tr.job[data-job-id="{job}"] .bar > span')
                               .style.width""") == "100%"

        # throughput chart and share of work follow within a sample or two
        wait_until(browser, lambda: js(browser, """
            return document.querySelector('.share[data-provider-id] .what')?.textContent.startsWith('100.0%');"""),
                   10, "the share of work")
        wait_until(browser, lambda: browser.find_element("id", "t-gflops").text != "0.00 GFLOP/s"
                   or "job.done" in browser.find_element("id", "events").text, 10, "the throughput tile")
        assert js(browser, "return document.querySelectorAll('#chart-throughput canvas').length") == 1
        assert "job.done" in browser.find_element("id", "events").text
        assert browser.find_element("id", "alerts-empty").text == "No alerts."
        time.sleep(1.2)  # one more sample, so the chart shows the job

        shot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if os.environ.get("DCF_ARTIFACTS"):
            out = Path(os.environ["DCF_ARTIFACTS"])
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, out / "dashboard.png")
        assert console_errors(browser) == []


def test_dashboard_takes_token_from_query(browser: Any) -> None:
    cl = LocalCluster(0, heartbeat=0.5, threads=1, head_args=["--api-token", "s3cret"])
    try:
        cl.start_head()
        browser.get(cl.url + "/")
        wait_until(browser, lambda: browser.find_element("id", "token-form").is_displayed(), 20,
                   "the page to ask for a token")
        assert js(browser, "return document.getElementById('conn').dataset.state") == "auth"

        browser.get(cl.url + "/?token=s3cret")
        wait_until(browser, lambda: js(browser, "return document.getElementById('conn').dataset.state") == "live",
                   20, "the stream to connect with the token")
        assert "token" not in browser.current_url  # kept in local storage, not left in the address bar
        assert not browser.find_element("id", "token-form").is_displayed()
        assert js(browser, "return localStorage.getItem('dcf.token')") == "s3cret"
        errors = [e for e in console_errors(browser) if "401" not in e]  # the first load's refusals
        assert errors == []
    finally:
        cl.stop()


def only_local_requests(driver: Any, base: str) -> list[str]:
    """What the page fetched from anywhere but the head (none: the page works offline)."""
    names: list[str] = js(driver, "return performance.getEntriesByType('resource').map((e) => e.name)")
    return [n for n in names if not n.startswith(base + "/")]


def test_a_dead_provider_shows_dead_and_events_stay_in_order(browser: Any) -> None:
    with LocalCluster(2, heartbeat=0.25, threads=1) as cl, Client(cl.url) as c:
        browser.get(cl.url + "/")
        wait_until(browser, lambda: js(browser, """
            return [...document.querySelectorAll('tr.node')].filter((r) => r.dataset.state === 'ready').length;""")
                   == 2, 30, "both providers ready")
        assert browser.find_element("id", "nodes-count").text == "2 connected"
        c.matmul(np.ones((50, 40)), np.ones((40, 30)))  # some job events to order
        victim = cl.providers[1]
        victim.kill()  # kill -9: no goodbye, the head finds out from the missed heartbeats
        victim.wait(10)
        dead = wait_until(browser, lambda: js(browser, """
            const row = [...document.querySelectorAll('tr.node')].find((r) => r.dataset.state === 'dead');
            return row ? [row.dataset.name, row.querySelector('.state-dot').className,
                          row.querySelector('.badge').textContent] : null;"""), 30, "the provider shown dead")
        assert dead[1] == "state-dot dead" and dead[2] == "dead", dead
        assert browser.find_element("id", "nodes-count").text == "1 connected · 1 dead"
        live = js(browser, "return document.querySelector('tr.node[data-state=\"ready\"] .state-dot').className")
        assert live == "state-dot ready"
        assert js(browser, "return getComputedStyle(document.querySelector('.state-dot.dead')).backgroundColor") != \
            js(browser, "return getComputedStyle(document.querySelector('.state-dot.ready')).backgroundColor")
        wait_until(browser, lambda: "node.lost" in browser.find_element("id", "events").text, 10, "node.lost")
        seqs = js(browser, "return [...document.querySelectorAll('#events li[data-seq]')].map((li) => +li.dataset.seq)")
        assert len(seqs) > 5 and seqs == sorted(set(seqs), reverse=True), seqs  # newest first, each once
        kinds = js(browser, "return [...document.querySelectorAll('#events li .kind')].map((k) => k.textContent)")
        assert kinds.index("job.accepted") > kinds.index("job.done"), kinds  # listed newest first
        assert only_local_requests(browser, cl.url) == []
        assert console_errors(browser) == []


def test_throughput_is_spread_over_the_time_the_work_took(browser: Any) -> None:
    # the provider sleeps 2.5 s before each subtask: its flops all arrive at the end, and the
    # chart must show them over the >= 2.5 s the subtask took (samples the page already had are
    # amended), never as one spike of all the flops in one 1 s sample
    n = 600
    flops = 2.0 * n ** 3
    with LocalCluster(1, heartbeat=0.5, threads=1, provider_args=["--delay", "2.5"]) as cl, Client(cl.url) as c:
        browser.get(cl.url + "/")
        wait_until(browser, lambda: js(browser, "return document.getElementById('conn').dataset.state") == "live",
                   20, "the stream to connect")
        time.sleep(1.5)  # a sample or two of the idle provider first
        c.matmul(np.ones((n, n)), np.ones((n, n)), nodes=1)
        pid = c.nodes()[0]["provider_id"]
        values = wait_until(browser, lambda: js(browser, f"""
            const col = window.dcfDashboard.series().providers["{pid}"];
            const v = col ? col.values.filter((x) => x > 0) : [];
            return v.length ? v : null;"""), 10, "the provider's throughput in the chart")
        time.sleep(1.5)  # the samples after the result
        values, work = js(browser, f"""
            const S = window.dcfDashboard.series(), col = S.providers["{pid}"].values;
            let work = 0;  // GFLOP: each sample's rate times its interval
            for (let i = 1; i < S.t.length; i++) if (col[i] > 0) work += col[i] * (S.t[i] - S.t[i - 1]);
            return [col.filter((x) => x > 0), work];""")
        assert len(values) >= 2, values
        assert max(values) <= flops / 2.5 / 1e9 * 1.001, values  # at most the work over the time it took
        assert abs(work - flops / 1e9) / (flops / 1e9) < 0.01, (work, values)  # all of it, once


def test_api_docs_render_from_the_head_alone(browser: Any) -> None:
    cl = LocalCluster(0, heartbeat=0.5)
    try:
        cl.start_head()
        browser.get(cl.url + "/docs")
        title = wait_until(browser, lambda: js(browser, """
            const t = document.querySelector('.swagger-ui .info .title'); return t && t.textContent;"""),
                           30, "Swagger UI to render")
        assert "dcf head" in title
        wait_until(browser, lambda: js(browser, "return document.querySelectorAll('.opblock').length") > 10, 10,
                   "the operations")
        assert only_local_requests(browser, cl.url) == []
        browser.get(cl.url + "/redoc")
        wait_until(browser, lambda: js(browser, "return document.querySelector('.api-content h1')?.textContent"),
                   30, "ReDoc to render")
        assert only_local_requests(browser, cl.url) == []
    finally:
        cl.stop()
