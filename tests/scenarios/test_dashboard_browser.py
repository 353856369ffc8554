"""The dashboard in a real browser (headless Chromium driven by Playwright) against a real
``simvue server`` holding a real ``mpiexec -n 4`` run, and against ``simvue ui`` over a local
store.  Screenshots of every view go to ``test-output/dashboard/`` (kept by CI with the rest
of the test output): look at them, a page can pass these checks and still look wrong."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, mpiexec

pytest.importorskip("fastapi", reason='the server extra is not installed: pip install "simvue[server]"')
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (scripts/test.sh installs it)")

from simvue.server.local import ServerProcess  # noqa: E402

CHROMIUM = os.environ.get("SIMVUE_TEST_CHROMIUM", "/usr/bin/chromium")
SHOTS = ROOT / "test-output" / "dashboard"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"no Chromium at {CHROMIUM} (scripts/test.sh installs Debian's chromium package when run as root)",
)

JOB = textwrap.dedent(
    """
    import math, os, sys, tempfile, time
    from simvue import Run
    steps, pause = int(sys.argv[2]), float(sys.argv[3])
    with Run() as run:
        run.config(resources_metrics_interval=1)
        run.init(name=sys.argv[1], folder="/browser", tags=["mpi"], reduce={"loss": ["mean", "min", "max", "namespace"]})
        if run.rank == 0:
            path = os.path.join(tempfile.mkdtemp(), "result.txt")
            with open(path, "w") as out:
                out.write("hello from rank 0")
            run.save_file(path, category="output")
        for step in range(steps):
            run.log_metrics({"loss": math.exp(-step / 100) + 0.1 * run.rank}, step=step)
            if run.rank == 1 and step == steps // 2:
                run.log_event("rank one is halfway", log_level="warning")
            time.sleep(pause)
        run.log_event("finished")
    """
)


def _env(server: ServerProcess, tmp: Path) -> dict[str, str]:
    return {**server.env, "SIMVUE_STORE": str(tmp / "store"), "SIMVUE_RENDEZVOUS_DIR": str(tmp / "rendezvous"),
            "SIMVUE_UPLOAD_INTERVAL_S": "0.2"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A server with one finished 4-rank run; yields (server, run id, a directory for more)."""
    tmp = tmp_path_factory.mktemp("browser")
    server = ServerProcess(tmp / "server-data")
    try:
        (tmp / "job.py").write_text(JOB)
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("SIMVUE_AGGREGATOR", raising=False)
            result = mpiexec(4, sys.executable, str(tmp / "job.py"), "four-ranks", "400", "0.002",
                             env=_env(server, tmp), timeout=120)
        assert result.returncode == 0, result.stderr
        run = server.wait_for_status("four-ranks")
        assert run["status"] == "completed", run
        yield server, run["id"], tmp
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
            if message.type == "error" and "status of 401" not in message.text else None)  # a token refused: tested
    try:
        yield page
    finally:
        context.close()
    assert not problems, problems  # no script error on any page


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    assert (SHOTS / f"{name}.png").stat().st_size > 10_000  # a drawn page, not a blank one


def _open(page, server: ServerProcess, path: str) -> None:
    path, _, tab = path.partition("#")
    page.goto(f"{server.url}{path}?token={server.token}" + (f"#{tab}" if tab else ""))


def test_the_runs_list_shows_the_run_and_filters_it(site, page):
    server, run_id, _ = site
    _open(page, server, "/")
    row = page.wait_for_selector(f'#runs tr[data-run="{run_id}"]')
    assert row.query_selector("a").inner_text() == "four-ranks"
    assert row.query_selector(".badge").inner_text() == "completed"
    assert "token=" not in page.url  # taken out of the address bar once kept
    _shot(page, "runs")
    page.fill("#filter-name", "no-such-run")
    page.wait_for_selector("#runs td.empty")
    page.fill("#filter-name", "four")
    page.wait_for_selector(f'#runs tr[data-run="{run_id}"]')
    page.select_option("#filter-status", "failed")
    page.wait_for_selector("#runs td.empty")


def test_the_metrics_tab_draws_a_band_for_the_reduced_metric_and_a_line_per_rank(site, page):
    server, run_id, _ = site
    _open(page, server, f"/dashboard/runs/run/{run_id}")
    reduced = page.wait_for_selector('.chart[data-title="loss (over ranks)"][data-lines]')
    assert reduced.get_attribute("data-lines") == "3" and reduced.get_attribute("data-bands") == "1"
    per_rank = page.wait_for_selector('.chart[data-title="loss per process"][data-lines]')
    assert per_rank.get_attribute("data-lines") == "4"
    legend = per_rank.inner_text()
    assert all(f"rank{k}" in legend for k in range(4))
    assert page.inner_text("#run-processes") == "4"
    _shot(page, "metrics")


def test_the_heat_map_has_a_row_per_rank_and_a_click_opens_that_rank(site, page):
    server, run_id, _ = site
    _open(page, server, f"/dashboard/runs/run/{run_id}#ranks")
    page.wait_for_selector("#heat-labels div")
    labels = [div.inner_text() for div in page.query_selector_all("#heat-labels div")]
    assert labels == ["rank0", "rank1", "rank2", "rank3"]
    assert len(page.query_selector_all("#rank-table tbody tr")) == 4
    box = page.query_selector("#heatmap").bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] * 2.5 / 4)  # the third row
    chart = page.wait_for_selector('.chart[data-title="rank2: loss"][data-lines]')
    assert chart.get_attribute("data-lines") == "1"
    assert "selected" in page.get_attribute('#heat-labels div[data-label="rank2"]', "class")
    _shot(page, "ranks")


def test_the_events_filter_keeps_only_the_chosen_level_and_process(site, page):
    server, run_id, _ = site
    _open(page, server, f"/dashboard/runs/run/{run_id}#events")
    page.wait_for_selector("#events tbody tr")
    assert len(page.query_selector_all("#events tbody tr")) == 5  # four "finished" and one warning
    page.select_option("#event-level", "warning")
    rows = page.query_selector_all("#events tbody tr")
    assert len(rows) == 1 and "rank one is halfway" in rows[0].inner_text()
    page.select_option("#event-level", "")
    page.select_option("#event-rank", "rank3")
    rows = page.query_selector_all("#events tbody tr")
    assert [r.query_selector("td:last-child").inner_text() for r in rows] == ["[rank3] finished"]
    _shot(page, "events")


def test_the_resources_and_metadata_tabs_show_every_rank_and_the_node(site, page):
    server, run_id, _ = site
    _open(page, server, f"/dashboard/runs/run/{run_id}#resources")
    page.wait_for_selector("#heat-labels div")
    assert [d.inner_text() for d in page.query_selector_all("#heat-labels div")] == [f"rank{k}" for k in range(4)]
    page.wait_for_selector('.chart[data-title="CPU %"][data-lines]')
    _shot(page, "resources")
    page.click('.tabs a[data-tab="metadata"]')
    page.wait_for_selector("#processes tbody tr")
    assert len(page.query_selector_all("#processes tbody tr")) == 4
    assert page.query_selector("#hosts tbody tr") is not None
    _shot(page, "metadata")
    page.click('.tabs a[data-tab="artifacts"]')
    link = page.wait_for_selector("#artifacts tbody a")
    assert link.inner_text() == "rank0/result.txt" and link.get_attribute("href").startswith(server.url)
    with page.expect_download() as download:
        link.click()
    assert Path(download.value.path()).read_text() == "hello from rank 0"


def test_a_running_run_gains_points_without_a_reload(site, page):
    server, _, tmp = site
    job = subprocess.Popen([sys.executable, str(tmp / "job.py"), "still-running", "150", "0.1"],
                           env={**os.environ, **_env(server, tmp)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            found = [r for r in server.get("/runs")["data"] if r["name"] == "still-running"]
            if found and sum(m["count"] for m in found[0]["metrics"].values()) > 0:
                break
            assert time.monotonic() < deadline, "the run never reached the server"
            time.sleep(0.2)
        _open(page, server, f"/dashboard/runs/run/{found[0]['id']}")
        page.select_option("#live-interval", "2")
        page.wait_for_selector(".chart[data-lines]")
        before = int(re.sub(r"\D", "", page.inner_text("#run-points")))
        page.wait_for_function(
            f"() => Number(document.querySelector('#run-points').textContent.replace(/\\D/g, '')) > {before}",
            timeout=15_000)
        _shot(page, "running")
        page.click("#live-pause")
        assert page.inner_text("#live-state") == "paused"
        paused_at = page.inner_text("#run-points")
        time.sleep(4.5)  # two intervals
        assert page.inner_text("#run-points") == paused_at
    finally:
        job.wait(timeout=60)
    assert job.returncode == 0, job.stderr.read()


def test_a_wrong_token_asks_for_one_and_docs_need_no_network(site, page):
    server, run_id, _ = site
    page.goto(f"{server.url}/dashboard/runs/run/{run_id}?token=not-a-token")
    page.wait_for_selector("#token-dialog[open]")
    page.fill("#token-input", server.token)
    page.click("#token-form button")
    page.wait_for_selector('.chart[data-title="loss per process"][data-lines]')
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{server.url}/docs")
    page.wait_for_selector(".route")
    assert page.query_selector_all(".route code")
    assert all(url.startswith(server.url) or url.startswith("data:") for url in requested), requested


def test_simvue_ui_serves_a_local_store_on_loopback_with_a_token(site, page):
    _, _, tmp = site
    ui = subprocess.Popen([sys.executable, "-m", "simvue.cli", "ui", "--store", str(tmp / "store"), "--port", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [ui.stdout.readline() for _ in range(2)]
        url = lines[1].strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/dashboard/runs\?token=\S+", url), lines
        base = url.split("/dashboard")[0]
        import requests

        assert requests.get(f"{base}/api/runs", timeout=10).status_code == 401  # the token is needed
        page.goto(url)
        page.wait_for_selector("#runs tbody tr[data-run]")
        names = [a.inner_text() for a in page.query_selector_all("#runs tbody a")]
        assert "four-ranks" in names
        page.click("text=four-ranks")
        per_rank = page.wait_for_selector('.chart[data-title="loss per process"][data-lines]')
        assert per_rank.get_attribute("data-lines") == "4"
        _shot(page, "ui-local-store")
        page.click('.tabs a[data-tab="artifacts"]')
        link = page.wait_for_selector("#artifacts tbody a")  # from the store itself: fetched with the token
        assert link.inner_text() == "rank0/result.txt"
        with page.expect_download() as download:
            link.click()
        assert Path(download.value.path()).read_text() == "hello from rank 0"
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    assert ui.returncode == 0, ui.stderr.read()
