"""The Prefect UI in a real browser (Debian's Chromium through chromium-driver, installed
by `make chromium-bin`) after a monitor run on the demo data: the UI reaches its API, the
monitoring artifact shows its charts, the flow run page lists the artifacts.

Each check runs on every UI the server offers (Prefect 3.8 serves V2 by default and V1
beside it). The UI is a single-page app: the checks wait for what they expect, never for
a fixed time. A failing check leaves a screenshot and the page's HTML in its tmp dir."""

from __future__ import annotations

import base64
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from driftloop.demo_data import DEMO_SPEC, demo_data_path
from driftloop.flows.ingest import ingest
from driftloop.flows.monitor import monitor
from driftloop.flows.score import score
from tests.support.models import train_fast

pytestmark = [pytest.mark.e2e, pytest.mark.prefect, pytest.mark.usefixtures("prefect_server")]

WAIT_S = 60
NO_API = ("Can't connect to Server API", "Unable to connect to Prefect server")  # V1's, V2's
DATA_URI = re.compile(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ARTIFACTS_TAB = ("//*[(@role='tab' or self::button or contains(concat(' ', @class, ' '), ' p-tab '))"
                 " and normalize-space(.)='Artifacts']")


def _browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        raise RuntimeError("Chromium or chromium-driver not found on PATH; run `make chromium-bin` "
                           "(installs Debian's chromium and chromium-driver packages)")
    return chromium, driver


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory, prefect_server) -> Iterator[dict]:
    """One monitor run on the demo's drifted period, labels included: every chart kind."""
    root = tmp_path_factory.mktemp("ui")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRIFTLOOP_HOME", str(root / "home"))
        reference = ingest(spec_path=str(DEMO_SPEC), source=str(demo_data_path("reference")))
        train_fast(spec_path=str(DEMO_SPEC), dataset_id=reference.dataset_id, trials=2, algorithms=["xgboost"], parity_min_rows=5000)
        scored = score(input_uri=str(demo_data_path("analysis")), model="car_loan")
        state = monitor(scoring_run=scored.run_id, model="car_loan", labels_uri=str(demo_data_path("analysis_targets")),
                        return_state=True)
        state.result()
        run_id = str(state.state_details.flow_run_id)
        flow_run = httpx.get(f"{prefect_server.api_url}/flow_runs/{run_id}", timeout=30).raise_for_status().json()
        artifacts = httpx.post(f"{prefect_server.api_url}/artifacts/filter", timeout=30,
                               json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).raise_for_status().json()
        yield {"flow_run_id": run_id, "flow_run_name": flow_run["name"], "artifacts": artifacts}


@pytest.fixture(scope="module")
def uis(prefect_server) -> list[tuple[str, str]]:
    """(version, base URL) of each UI the server serves, its default first."""
    base = prefect_server.api_url.removesuffix("/api")
    settings = httpx.get(f"{base}/ui-settings", timeout=30).raise_for_status().json()
    assert settings["api_url"] == prefect_server.api_url  # what the UI will call
    versions = sorted(settings.get("available_uis") or ["v1"], key=lambda v: v != settings.get("default_ui"))
    return [(v, base + (settings.get(f"{v}_base_url") or "/").rstrip("/")) for v in versions]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # with the driver's path given, Selenium Manager downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1100",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@contextmanager
def evidence_on_failure(driver, tmp_path: Path, name: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        driver.save_screenshot(str(tmp_path / f"{name}.png"))
        (tmp_path / f"{name}.html").write_text(driver.page_source)
        print(f"browser evidence: {tmp_path / name}.png, .html ({driver.current_url})")
        raise


def wait_for(driver, condition: Callable[[object], object], what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(condition)
    except TimeoutException:
        raise AssertionError(f"{what} (waited {WAIT_S}s on {driver.current_url})") from None


def body_text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''") or ""


def test_the_ui_reaches_its_api(browser, uis, monitored, prefect_server, tmp_path: Path) -> None:
    """The address the demo prints, and each UI's page of the monitor run: the UI's own
    health check went to this server's API (not 127.0.0.1:4200) and no UI says it cannot
    connect; the run page shows the run's name, which only the API knows."""
    health = f"{prefect_server.api_url}/health"
    checked = "return performance.getEntriesByType('resource').some(e => e.name === arguments[0])"
    pages = [("home", prefect_server.api_url.removesuffix("/api") + "/", None)]
    pages += [(f"flow-run-{version}", f"{ui}/runs/flow-run/{monitored['flow_run_id']}", monitored["flow_run_name"])
              for version, ui in uis]
    for name, url, expected in pages:
        with evidence_on_failure(browser, tmp_path, name):
            browser.get(url)
            wait_for(browser, lambda d: d.execute_script(checked, health) or any(m in body_text(d) for m in NO_API),
                     f"{url}: the UI never called {health}")
            assert not [m for m in NO_API if m in body_text(browser)], f"{url}: the UI cannot reach its API"
            if expected:
                wait_for(browser, lambda d, e=expected: e in body_text(d) or any(m in body_text(d) for m in NO_API),
                         f"{url}: the page never showed flow run {expected}")
            text = body_text(browser)
            assert not [m for m in NO_API if m in text], f"{url}: the UI cannot reach its API"
            if expected:
                assert expected in text


def test_the_monitoring_artifact_shows_its_charts(browser, uis, monitored, tmp_path: Path) -> None:
    (artifact,) = [a for a in monitored["artifacts"] if a["key"] == "monitoring-car-loan"]
    charts = [base64.b64decode(encoded) for encoded in DATA_URI.findall(artifact["data"])]
    assert len(charts) == 3 and all(png.startswith(PNG_SIGNATURE) and len(png) < 100_000 for png in charts)
    assert artifact["data"].index("**Policy:") < artifact["data"].index("![") < artifact["data"].index("| chunk |")
    loaded = """return [...document.images].filter(i => i.src.startsWith('data:image/png'))
                .map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])"""

    def all_loaded(driver) -> list | None:
        images = driver.execute_script(loaded)
        return images if len(images) >= len(charts) and all(complete for complete, *_ in images) else None

    for version, ui in uis:
        with evidence_on_failure(browser, tmp_path, f"artifact-{version}"):
            browser.get(f"{ui}/artifacts/artifact/{artifact['id']}")
            images = wait_for(browser, all_loaded, f"{ui}: the artifact page never showed {len(charts)} chart images")
            assert len(images) == len(charts)
            assert all(width > 0 and height > 0 for _, width, height, _ in images), images
            assert [alt for *_, alt in images] == ["Estimated and realized performance per chunk",
                                                   "Univariate drift per feature and chunk",
                                                   "Multivariate drift (data reconstruction error) per chunk"]


def test_the_flow_run_page_lists_the_artifacts(browser, uis, monitored, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    keys = sorted(a["key"] for a in monitored["artifacts"] if a.get("key"))
    assert {"monitoring-car-loan", "monitoring-results-car-loan"} <= set(keys)
    for version, ui in uis:
        with evidence_on_failure(browser, tmp_path, f"flow-run-{version}"):
            browser.get(f"{ui}/runs/flow-run/{monitored['flow_run_id']}")
            tab = wait_for(browser, lambda d: next((e for e in d.find_elements(By.XPATH, ARTIFACTS_TAB) if e.is_displayed()), None),
                           f"{ui}: the flow run page has no Artifacts tab")
            tab.click()
            wait_for(browser, lambda d: all(k in body_text(d) for k in keys),
                     f"{ui}: the flow run's Artifacts tab never listed {keys}")
