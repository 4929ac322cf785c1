"""Screenshots of the service's web page with a shipped example (the README's picture).

Usage, against a running ``bentoml serve``::

    python examples/page_screenshot.py http://127.0.0.1:3000 docs/results --example shirt.png

writes ``page.png`` (the example predicted by every served model, ε = 36/255) and
``page-models.png`` (the models view). Drives Debian's ``chromium`` (``make browser``) with
Playwright; ``--chromium`` names another executable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url", help="the service, e.g. http://127.0.0.1:3000")
    parser.add_argument("out", type=Path, help="folder for page.png and page-models.png")
    parser.add_argument("--example", default="shirt.png", help="a file in examples/")
    parser.add_argument("--model", default="__all__", help="a model name, or __all__")
    parser.add_argument("--eps", type=int, default=36, help="ε in 1/255 steps (default 36)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, headless=True,
                                     args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": 800})
        page.goto(args.url.rstrip("/") + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        page.eval_on_selector("#eps", "(el, v) => { el.value = v; "
                              "el.dispatchEvent(new Event('input', {bubbles: true})); }", args.eps)
        page.select_option("#model", args.model)
        page.locator(f".example[data-file='{args.example}']").click()
        expected = page.locator("#model option").count() - 1 if args.model == "__all__" else 1
        page.wait_for_function(
            "([n, file]) => document.querySelectorAll('.result .radius').length === n && "
            "document.querySelector('#preview-caption').textContent.startsWith(file)",
            arg=[expected, args.example], timeout=60_000)
        page.screenshot(path=str(args.out / "page.png"), full_page=True)
        page.click("#nav-models")
        page.wait_for_selector("#models-view:not([hidden])")
        page.screenshot(path=str(args.out / "page-models.png"), full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
