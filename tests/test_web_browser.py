"""`dforge serve` end to end in a real headless browser: Debian's chromium driven by Playwright.

The page loads; a generation with a tiny trained model completes and shows its grid and trajectory; a
class-conditional run offers the class "data" (classes drawn from the training set's shares, unguided); a bad
input (steps out of range, a missing run) shows its one-line message on the page. Screenshots are written
to outputs/test-artifacts/web/ (kept after the run, for a person to look at)."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_web import serving, tiny_class_run, tiny_run  # noqa: F401 (fixtures)

ARTIFACTS = Path(__file__).resolve().parents[1] / "outputs" / "test-artifacts" / "web"
TIMEOUT = 30_000         # ms: a generous bound on a loaded 2-core machine


@pytest.fixture(scope="module")
def page(chromium, tiny_run, tiny_class_run, tmp_path_factory):  # noqa: F811
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with serving([tiny_run, tiny_class_run], tmp_path_factory.mktemp("web-out")) as (_, url), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.set_default_timeout(TIMEOUT)
            page.goto(url)
            page.get_by_role("tab", name="Runs").wait_for()           # the page has rendered
            yield page
        finally:
            browser.close()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(value)
    box.press("Tab")


def test_the_page_loads_with_its_tabs_and_draws_the_schedules(page):
    for name in ("Schedules", "Forward process", "Generate", "Compare", "Runs"):
        assert page.get_by_role("tab", name=name).count() == 1
    page.get_by_role("button", name="Draw").first.click()
    page.locator("#schedules-plot img").wait_for(state="visible")
    page.screenshot(path=str(ARTIFACTS / "schedules.png"), full_page=True)


def test_a_generation_completes_and_shows_its_images(page):
    _tab(page, "Generate")
    page.get_by_text("unconditional; its own sampler").wait_for()            # the model's controls arrived
    _fill(page, "gen-steps", "4")
    page.locator("#gen-go").click()
    page.locator("#gen-grid img").wait_for(state="visible")
    page.locator("#gen-trajectory img").wait_for(state="visible")
    status = page.locator("#gen-status textarea").input_value()
    from diffusion_forge.sampling.registry import default_sampler
    assert f"16 images, {default_sampler(4)[0]} 4 steps, seeds 0..15" in status, status
    assert page.locator("#gen-strip img").is_visible()                         # the live trajectory strip
    page.screenshot(path=str(ARTIFACTS / "generate.png"), full_page=True)


def test_a_class_run_offers_data_which_sets_w_to_1_and_samples_like_the_data(page, tiny_class_run):  # noqa: F811
    from diffusion_forge.sampling.registry import default_sampler
    from diffusion_forge.web.callbacks import DATA_CHOICE

    _tab(page, "Generate")
    model = page.locator("#gen-model input").first
    model.fill(str(tiny_class_run))
    model.press("Enter")
    page.get_by_text("10 classes, guidance w = ").first.wait_for()       # the class run's controls arrived
    assert page.locator("#gen-guidance input").first.input_value() != "1"  # the run's recommended w
    page.locator("#gen-class input").first.click()
    page.get_by_role("option", name=DATA_CHOICE).click()
    page.wait_for_function("() => document.querySelector('#gen-guidance input').value === '1'")  # unguided
    _fill(page, "gen-steps", "4")
    page.locator("#gen-go").click()
    # the grid of the test before may still be shown: wait for this generation's own status line
    page.wait_for_function("() => document.querySelector('#gen-status textarea').value.includes('classes drawn')")
    page.locator("#gen-grid img").wait_for(state="visible")
    status = page.locator("#gen-status textarea").input_value()
    assert "classes drawn from the training set's shares, w = 1," in status, status     # w = 1: unguided
    assert f"{default_sampler(4, 'data')[0]} 4 steps" in status, status
    page.screenshot(path=str(ARTIFACTS / "generate-class-data.png"), full_page=True)


def test_bad_input_shows_a_message_not_a_traceback(page):
    _tab(page, "Generate")
    _fill(page, "gen-steps", "1000")
    page.locator("#gen-go").click()
    message = page.get_by_text("steps must lie in [1, 200], got 1000")
    message.first.wait_for(state="visible")
    page.screenshot(path=str(ARTIFACTS / "bad-steps.png"))                  # the viewport, with the message
    assert "Traceback" not in page.content()
    model = page.locator("#gen-model input").first
    model.fill("/no/such/run")
    model.press("Enter")
    page.get_by_text("no run folder at /no/such/run: it does not exist").first.wait_for(state="visible")
    page.screenshot(path=str(ARTIFACTS / "missing-run.png"))
    assert "Traceback" not in page.content()
