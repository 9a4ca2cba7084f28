"""Screenshot of the MLflow runs view (docs/mlflow-runs.png): both studies expanded, names readable.

Start the UI on the store of a `make run` first (`make ui`), then, in a throwaway environment
with Playwright and Debian's Chromium (`apt install chromium`, `pip install playwright`):

    python docs/screenshot_runs.py "$(printed runs URL)" docs/mlflow-runs.png
"""

import argparse

from playwright.sync_api import sync_playwright

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the runs view URL that `make ui` prints")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="browser executable")
    args = parser.parse_args()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 760})
        page.goto(args.url)
        page.get_by_text("Run Name").first.wait_for(timeout=30_000)
        page.wait_for_timeout(2_000)
        page.get_by_role("button", name="Close", exact=True).click()  # the assistant panel
        expanders = page.locator("[role='row'] button:not([aria-label])")  # one per study (parent run)
        for index in reversed(range(expanders.count())):
            expanders.nth(index).click()
            page.wait_for_timeout(700)
        header = page.locator("[role='columnheader']", has_text="Run Name").first.bounding_box()
        y = header["y"] + header["height"] / 2
        page.mouse.move(header["x"] + header["width"] - 2, y)  # widen the column: the names are the point
        page.mouse.down()
        page.mouse.move(header["x"] + header["width"] + 200, y, steps=15)
        page.mouse.up()
        page.wait_for_timeout(1_500)
        page.screenshot(path=args.out)
        browser.close()


if __name__ == "__main__":
    main()
