"""Take a screenshot of the RabbitMQ management console (used for docs/OPERATIONS.md).

Not part of dssgd: a documentation helper. Needs Debian's chromium and the `playwright` Python
package (with its bundled driver; no browser download, it drives /usr/bin/chromium):

    python docs/tools/console_screenshot.py --page queues --out docs/img/console-queues.png
"""

from __future__ import annotations

import argparse

from playwright.sync_api import sync_playwright


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:15672")
    ap.add_argument("--user", default="guest")
    ap.add_argument("--password", default="guest")
    ap.add_argument(
        "--page",
        default="queues",
        help="console page: overview, queues, queues/%%2F/<queue name>, exchanges, connections",
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=900)
    args = ap.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(args.url + "/")
        page.fill("input[name=username]", args.user)
        page.fill("input[name=password]", args.password)
        page.click("input[type=submit]")
        page.wait_for_selector("#logout", timeout=15000)
        page.goto(f"{args.url}/#/{args.page}")
        page.wait_for_timeout(6000)  # let the console poll and draw its rate charts
        page.screenshot(path=args.out, full_page=False)
        browser.close()


if __name__ == "__main__":
    main()
