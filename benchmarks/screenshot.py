"""The playground's picture in docs/serve.md: serve a run, open the page in headless Chromium
(Debian's `chromium`, driven by Playwright; nothing downloaded), have a conversation in Chat mode,
point at a token of the reply so its tip shows, and save a screenshot.

    python benchmarks/screenshot.py --run runs/reverse --out docs/playground-chat.png
        [--message "reverse: quill" ...] [--width 1280] [--height 800]

The run is one with a chat template (`quill sft`; docs/chat.md's reversal skill is the one the docs
show). The server runs in this process on a free loopback port; the replies use the page's own
settings (the run's recommended temperature).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.script import run_main  # noqa: E402
from quillgpt.errors import QuillError  # noqa: E402

IDLE = "document.getElementById('send').disabled === false && document.getElementById('chat-stop').disabled"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


def chromium() -> str:
    found = os.environ.get("QUILL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(found).is_file():
        raise QuillError(f"no Chromium at {found}: apt-get install chromium chromium-driver")
    return found


def shoot(url: str, messages: list[str], out: Path, width: int, height: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url + "/")
        for text in messages:
            page.fill("#message", text)
            page.press("#message", "Enter")
            page.wait_for_function(IDLE, timeout=600_000)
        tokens = page.locator("#messages .assistant .tok")
        if tokens.count():
            tokens.nth(min(1, tokens.count() - 1)).hover()
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run directory with a chat template")
    parser.add_argument("--out", type=Path, default=Path("out/playground-chat.png"))
    parser.add_argument("--message", action="append", help="a message to send (repeatable)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    args = parser.parse_args()
    from quillgpt.checkpoint import load_run
    from quillgpt.serve import BackgroundServer, create_app

    run = load_run(args.run)
    with BackgroundServer(create_app(run)) as url:
        shoot(url, args.message or ["reverse: quill"], args.out, args.width, args.height)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
