"""The Space in a real browser: Playwright drives Debian's headless chromium against the app on 127.0.0.1."""

import shutil

import pytest

from modeling_anatomy_vlm import ANATOMICAL_REGIONS
from test_space import launch_tiny_space

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH (apt-get install -y chromium)")
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    demo, space, url = launch_tiny_space(tmp_path_factory.mktemp("space-browser"))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.example_path = space.examples[0]
        yield page
        browser.close()
    demo.close()


def test_upload_shows_boxes_legend_table_notice_and_region_scores(page, tmp_path):
    page.locator("input[type=file]").first.set_input_files(page.example_path)

    masks = page.locator("#regions img.mask")
    legend = page.locator("#regions .legend-item")
    sync_api.expect(masks).to_have_count(len(ANATOMICAL_REGIONS), timeout=TIMEOUT_MS)
    assert legend.all_inner_texts() == list(ANATOMICAL_REGIONS)
    table = page.get_by_role("grid", name="Region x finding scores, highest first")
    rows = table.get_by_role("row").filter(has=page.get_by_role("gridcell"))
    sync_api.expect(rows.first).to_be_visible()
    cells = [row.get_by_role("gridcell").all_inner_texts() for row in rows.all()]
    assert cells and all(region in ANATOMICAL_REGIONS for region, _, _ in cells)
    scores = [float(score) for _, _, score in cells]
    assert scores == sorted(scores, reverse=True)

    sync_api.expect(page.locator("#model-notice")).to_contain_text("trained on synthetic phantoms only")
    sync_api.expect(page.locator("#model-notice")).to_contain_text("no clinical meaning")
    sync_api.expect(page.get_by_text("unlike the images the model was trained on")).to_have_count(0)  # not flagged

    page.get_by_role("button", name="cardiac silhouette", exact=True).click()  # AnnotatedImage select
    sync_api.expect(page.get_by_text("cardiac silhouette: finding scores")).to_be_visible()

    page.get_by_label("Ask about any finding").fill("rib fracture")
    page.get_by_label("Ask about any finding").press("Enter")
    sync_api.expect(legend.first).to_contain_text("right lung: 0.")
    sync_api.expect(page.get_by_text("'rib fracture' per region")).to_be_visible()

    screenshot = tmp_path / "space.png"
    page.screenshot(path=screenshot, full_page=True)
    assert screenshot.stat().st_size > 0 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
