"""The playground end to end in headless Chromium: load the page, type a prompt, click Generate,
watch the text stream in, stop a generation, show an error. Saves screenshots (to
$QUILL_SCREENSHOT_DIR when set, else the test's tmp_path).

Needs Debian's `chromium` (apt-get install chromium chromium-driver) and the playwright Python
package; Playwright drives /usr/bin/chromium, it downloads no browser."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="quill serve needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="quill serve needs the serve extra (fastapi, uvicorn)")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from quillgpt.checkpoint import load_run  # noqa: E402
from quillgpt.config import load_config  # noqa: E402
from quillgpt.generate import generate  # noqa: E402
from quillgpt.serve import BackgroundServer, ServeSettings, create_app  # noqa: E402
from quillgpt.train import Trainer  # noqa: E402

CHROMIUM = os.environ.get("QUILL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(),
    reason=f"no Chromium at {CHROMIUM} (apt-get install chromium chromium-driver; CI installs it)",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A few training steps of a tiny GPT on verse: a real run directory, loaded."""
    root = tmp_path_factory.mktemp("browser")
    data = root / "verse.txt"
    data.write_text("To be, or not to be, that is the question:\n" * 60, encoding="utf-8")
    cfg = load_config(None, {
        "data": str(data), "out": str(root / "run"), "n_layer": 1, "n_head": 2, "n_embd": 32,
        "block_size": 32, "batch_size": 8, "max_iters": 10, "eval_interval": 5, "eval_iters": 2,
        "log_interval": 5, "warmup_iters": 2, "device": "cpu", "sample_tokens": 0,
    })
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUILL_CACHE", str(root / "cache"))
        Trainer(cfg, progress=False, log=lambda msg: None).run()
    return load_run(root / "run")


@pytest.fixture(scope="module")
def server(run):
    app = create_app(run, ServeSettings(max_tokens_cap=1_000_000))
    with BackgroundServer(app) as url:
        yield url, app.state.engine


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    # bypass_csp: the test's own probes (wait_for_function) are evaluated JavaScript, which the
    # page's Content-Security-Policy forbids; test_page_runs_under_its_csp checks the page alone
    page = browser.new_page(viewport={"width": 1200, "height": 800}, bypass_csp=True)
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url) if "/v1/completions" not in r.url else None)
    page.on("pageerror", lambda e: failed.append(f"page error: {e}"))
    page.goto(server[0] + "/")
    page.wait_for_function("document.getElementById('model-id').textContent === 'run'")
    yield page
    assert failed == []  # every asset loaded from this server, no script errors
    page.close()


def screenshot(page, tmp_path: Path, name: str) -> Path:
    out = Path(os.environ.get("QUILL_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


# records every change of the output text: (ms, length of the text so far, the stats line)
RECORD = """() => {
  window.updates = [];
  new MutationObserver(() => window.updates.push([performance.now(),
      document.getElementById('out-text').textContent.length,
      document.getElementById('stats').textContent]))
    .observe(document.getElementById('out-text'), {childList: true, characterData: true, subtree: true});
}"""


def test_type_prompt_generate_and_see_streamed_text(page, run, tmp_path):
    card = page.inner_text("#card")
    assert "parameters" in card and "1 layer, 2 heads, n_embd 32" in card and "val loss" in card
    page.evaluate(RECORD)
    page.fill("#prompt", "To be")
    page.fill("#temperature", "0.8")
    page.fill("#top_k", "10")
    page.fill("#top_p", "0.9")
    page.fill("#max_tokens", "1500")
    page.fill("#seed", "42")
    page.click("#generate")
    page.wait_for_function("document.getElementById('generate').disabled === false "
                           "&& document.getElementById('stats').textContent.includes('tokens/s')",
                           timeout=600_000)  # a hang guard, not a speed limit
    text = page.text_content("#out-text")
    assert text == generate(run.model, run.tokenizer, "To be", max_new_tokens=1500, temperature=0.8,
                            top_k=10, top_p=0.9, seed=42)
    assert page.text_content("#out-prompt") == "To be"
    stats = page.text_content("#stats")
    assert stats.startswith("1500 tokens · ") and "…" not in stats
    assert page.is_visible("#error") is False
    # streamed: the text grew in many steps, while the stats still said "in progress"
    updates = page.evaluate("window.updates")
    lengths = [n for _, n, _ in updates]
    assert lengths == sorted(lengths) and lengths[-1] == len(text)
    growing = sorted({n for _, n, s in updates if 0 < n < len(text) and s.endswith("…")})
    assert len(growing) >= 3, updates[:20]  # at least three partial texts shown before the end
    print("screenshot:", screenshot(page, tmp_path, "playground.png"))


def test_stop_button_ends_the_stream_and_frees_the_server(page, server, tmp_path):
    _, engine = server
    cancelled = engine.cancelled
    page.fill("#prompt", "To")
    page.fill("#max_tokens", "1000000")
    page.click("#generate")
    page.wait_for_function("document.getElementById('out-text').textContent.length > 20")
    assert page.is_enabled("#stop") and page.is_disabled("#generate")
    page.click("#stop")
    page.wait_for_function("document.getElementById('generate').disabled === false")
    deadline = time.monotonic() + 600  # a hang guard, not a speed limit
    while engine.pending or engine.cancelled == cancelled:
        assert time.monotonic() < deadline, "the server went on generating"
        time.sleep(0.05)
    assert engine.cancelled == cancelled + 1
    shown = len(page.text_content("#out-text"))
    assert 20 < shown < 1_000_000
    screenshot(page, tmp_path, "playground-stopped.png")


def test_bad_prompt_shows_the_servers_error(page, tmp_path):
    page.fill("#prompt", "To be \u20ac")
    page.fill("#max_tokens", "10")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "not in the tokenizer's vocabulary" in page.text_content("#error")
    assert page.text_content("#out-text") == "" and page.text_content("#stats") == ""
    screenshot(page, tmp_path, "playground-error.png")


def test_page_runs_under_its_content_security_policy(browser, server):
    """With the CSP enforced (scripts and styles from this server only, no eval) the page still
    loads its script and style and fills the model card; nothing is blocked."""
    page = browser.new_page()
    messages: list[str] = []
    page.on("console", lambda m: messages.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: messages.append(str(e)))
    page.goto(server[0] + "/")
    page.wait_for_selector("#card dt")
    assert page.text_content("#model-id") == "run"
    assert page.locator("#card dt").count() >= 10
    assert messages == []  # a blocked script, style or request would be reported here
    page.close()


# --- chat mode ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny model after a few SFT steps on conversations: it has the chat template. The
    replies it learns from are long (truncated to the context), so its own rarely end soon."""
    import json
    import random

    from quillgpt.sft import sft_trainer

    root = tmp_path_factory.mktemp("browser-chat")
    rng = random.Random(0)
    with open(root / "chats.jsonl", "w", encoding="utf-8") as f:
        for _ in range(40):
            w = "".join(rng.choice("abehinorstu") for _ in range(rng.randint(3, 6)))
            system = [{"role": "system", "content": "be brief"}] if rng.random() < 0.3 else []
            f.write(json.dumps({"messages": system + [{"role": "user", "content": f"turn: {w}"},
                                                      {"role": "assistant", "content": " ".join([w[::-1]] * 20)}]})
                    + "\n")
    cfg = load_config(None, {
        "data": str(root / "chats.jsonl"), "out": str(root / "chat"), "n_layer": 1, "n_head": 2, "n_embd": 32,
        "block_size": 96, "batch_size": 8, "max_iters": 10, "eval_interval": 5, "eval_iters": 1,
        "log_interval": 5, "warmup_iters": 2, "device": "cpu", "sample_tokens": 0, "learning_rate": 3e-3,
    })
    sft_trainer(cfg, progress=False, log=lambda msg: None).run()
    return load_run(root / "chat")


@pytest.fixture(scope="module")
def chat_server(chat_run):
    with BackgroundServer(create_app(chat_run)) as url:
        yield url


def open_page(browser, url, width=1280, height=800):
    page = browser.new_page(viewport={"width": width, "height": height}, bypass_csp=True)
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url) if "/v1/" not in r.url else None)
    page.on("pageerror", lambda e: failed.append(f"page error: {e}"))
    page.goto(url + "/", wait_until="domcontentloaded")
    return page, failed


IDLE = "document.getElementById('send').disabled === false && document.getElementById('chat-stop').disabled"


def bubbles(page) -> list[tuple[str, str]]:
    return [tuple(b) for b in page.evaluate("""() => [...document.querySelectorAll('#messages .msg')].map(
        li => [li.classList.contains('user') ? 'user' : 'assistant', li.querySelector('.text').textContent])""")]


def test_first_paint_shows_the_model_card_and_the_chat(browser, chat_server, tmp_path):
    """The card is in the HTML itself: right at DOMContentLoaded, before any script request."""
    page, failed = open_page(browser, chat_server)
    assert page.text_content("#model-id") == "chat"
    assert page.locator("#card dt").count() >= 12
    card = page.inner_text("#card")
    assert "chat template" in card and "yes" in card and "loading" not in page.content()
    assert page.get_attribute("#tab-chat", "aria-selected") == "true" and page.is_visible("#message")
    assert page.is_hidden("#chat-note")
    screenshot(page, tmp_path, "chat-first-paint.png")
    assert failed == []
    page.close()


def test_chat_streams_replies_keeps_history_regenerates_and_clears(browser, chat_server, chat_run, tmp_path):
    from quillgpt.chat import replies

    page, failed = open_page(browser, chat_server)
    page.click("#system-box summary")
    page.fill("#system", "be brief")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "12")
    page.fill("#message", "turn: heron")
    page.press("#message", "Enter")
    page.wait_for_function(IDLE, timeout=60_000)
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "turn: heron"}]
    first = replies(chat_run.model, chat_run.tokenizer, [convo], max_new_tokens=12, temperature=0)[0]
    assert bubbles(page) == [("user", "turn: heron"), ("assistant", first)]
    assert page.input_value("#message") == ""
    # the second message goes with the whole history
    page.fill("#message", "turn: stone")
    page.click("#send")
    page.wait_for_function(IDLE, timeout=60_000)
    convo += [{"role": "assistant", "content": first}, {"role": "user", "content": "turn: stone"}]
    second = replies(chat_run.model, chat_run.tokenizer, [convo], max_new_tokens=12, temperature=0)[0]
    assert bubbles(page)[2:] == [("user", "turn: stone"), ("assistant", second)]
    assert "tokens/s" in page.text_content("#stats")
    screenshot(page, tmp_path, "chat-laptop.png")
    # regenerate: the last reply again (greedy: the same), the history unchanged
    page.click("#regenerate")
    page.wait_for_function(IDLE, timeout=60_000)
    assert bubbles(page)[2:] == [("user", "turn: stone"), ("assistant", second)]
    page.click("#clear")
    assert bubbles(page) == [] and page.is_visible("#empty-chat") and page.is_disabled("#clear")
    assert failed == []
    page.close()


def test_chat_error_gives_the_message_back(browser, chat_server):
    page, _ = open_page(browser, chat_server)
    page.fill("#message", "turn: \u20ac")
    page.press("#message", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "vocabulary" in page.text_content("#error")
    assert bubbles(page) == [] and page.input_value("#message") == "turn: \u20ac"
    page.close()


def test_chat_stream_grows_and_stop_keeps_the_partial_reply(browser, chat_run):
    """A model whose replies never end (its end-of-turn logits pushed down): only Stop ends one."""
    from quillgpt.chat import end_ids
    from quillgpt.model import GPT

    never = sorted(end_ids(chat_run.tokenizer))

    class NeverEnds(GPT):
        def forward(self, idx, targets=None, cache=None):
            logits, loss = super().forward(idx, targets, cache)
            logits[..., never] = -1e9
            return logits, loss

    endless = load_run(chat_run.path)
    endless.model.__class__ = NeverEnds
    app = create_app(endless, ServeSettings(max_tokens_cap=1_000_000))
    with BackgroundServer(app) as url:
        stop_while_streaming(browser, url, app.state.engine)


def stop_while_streaming(browser, url, engine):
    page, _ = open_page(browser, url)
    page.fill("#max_tokens", "100000")
    page.fill("#temperature", "1")
    page.evaluate("""() => { window.lengths = [];
      new MutationObserver(() => { const t = document.querySelector('#messages .assistant .text');
        if (t) window.lengths.push(t.textContent.length); })
      .observe(document.getElementById('messages'), {childList: true, characterData: true, subtree: true}); }""")
    page.fill("#message", "turn: heron")
    page.press("#message", "Enter")
    page.wait_for_function("document.querySelector('#messages .assistant .text')?.textContent.length > 30",
                           timeout=60_000)
    page.click("#chat-stop")
    page.wait_for_function(IDLE, timeout=60_000)
    lengths = page.evaluate("window.lengths")
    assert len(set(lengths)) >= 3  # it grew in steps while streaming
    roles = [r for r, _ in bubbles(page)]
    assert roles == ["user", "assistant"] and len(bubbles(page)[1][1]) > 30
    assert "stopped" in page.text_content("#stats") and page.is_enabled("#regenerate")
    deadline = time.monotonic() + 30
    while engine.pending or engine.cancelled != 1:  # the server stopped generating too
        assert time.monotonic() < deadline, "the server went on generating"
        time.sleep(0.05)
    page.close()


@pytest.mark.parametrize("width", [390, 1280])
def test_both_modes_fit_laptop_and_phone_widths(browser, chat_server, tmp_path, width):
    page, failed = open_page(browser, chat_server, width=width, height=844 if width < 500 else 800)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    page.fill("#message", "turn: stone")
    page.press("#message", "Enter")
    page.wait_for_function(IDLE, timeout=60_000)
    # nothing sticks out sideways; the composer's buttons are on screen
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    for button in ("#send", "#regenerate", "#clear"):
        box = page.locator(button).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= width
    screenshot(page, tmp_path, f"chat-{width}.png")
    page.click("#tab-complete")
    assert page.is_visible("#prompt") and page.is_hidden("#message")
    page.fill("#prompt", "turn")
    page.click("#generate")
    page.wait_for_function("document.getElementById('generate').disabled === false", timeout=60_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    screenshot(page, tmp_path, f"complete-{width}.png")
    assert failed == []
    page.close()


def test_a_model_without_a_chat_template_opens_in_complete_mode(page):
    assert page.get_attribute("#tab-complete", "aria-selected") == "true" and page.is_visible("#prompt")
    page.click("#tab-chat")
    assert page.is_visible("#chat-note") and page.is_disabled("#message") and page.is_disabled("#send")


# --- token probabilities: each generated token a span; its tip shows the API's logprobs ----------

TIP = """() => { const tip = document.getElementById('token-tip'), p = tip.querySelector('.tip-p');
  return {hidden: tip.hidden, logprob: p && Number(p.dataset.logprob), shown: p && p.textContent,
          alts: [...tip.querySelectorAll('.tip-alts li')].map(li => [li.dataset.token, Number(li.dataset.logprob),
                                                                     li.querySelector('.p').textContent])}; }"""


def check_tip(tip: dict, logprob: float, alternatives: list[tuple[str, float]]) -> None:
    """The tip shows the token's probability (in (0, 1], as a percentage) and the alternatives the
    API lists for it, most likely first, with their probabilities."""
    import math

    assert not tip["hidden"]
    assert tip["logprob"] == pytest.approx(logprob, abs=1e-5)
    p = math.exp(tip["logprob"])
    assert 0 < p <= 1 and float(tip["shown"].rstrip("%")) == pytest.approx(100 * p, abs=0.006)
    assert [t for t, _, _ in tip["alts"]] == [t for t, _ in alternatives]
    for (_, lp, shown), (_, want) in zip(tip["alts"], alternatives):
        assert lp == pytest.approx(want, abs=1e-5)
        assert float(shown.rstrip("%")) == pytest.approx(100 * math.exp(want), rel=0.01, abs=1e-6)


def point_at(span) -> None:
    """Hover a token; one with no width of its own (a newline) is focused instead, as a keyboard
    user reaches it."""
    box = span.bounding_box()
    if box and box["width"] > 0:
        span.hover()
    else:
        span.focus()


def api(url: str, route: str, body: dict) -> dict:
    import httpx

    r = httpx.post(f"{url}{route}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_complete_mode_tokens_show_their_probability_and_alternatives(page, server, run):
    url, _ = server
    page.fill("#prompt", "To be")
    page.fill("#temperature", "0.8")
    page.fill("#top_k", "10")
    page.fill("#top_p", "1")
    page.fill("#max_tokens", "20")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_function("document.getElementById('generate').disabled === false "
                           "&& document.getElementById('stats').textContent.includes('tokens/s')", timeout=60_000)
    text = generate(run.model, run.tokenizer, "To be", max_new_tokens=20, temperature=0.8, top_k=10, seed=7)
    spans = page.locator("#out-text .tok")
    assert page.text_content("#out-text") == text
    assert "".join(spans.all_text_contents()) == text  # every character is in a token's span
    want = api(url, "/v1/completions", {"prompt": "To be", "max_tokens": 20, "temperature": 0.8, "top_k": 10,
                                         "seed": 7, "logprobs": 5})["choices"][0]
    assert want["text"] == text
    lp = want["logprobs"]
    assert spans.all_text_contents() == lp["tokens"] and spans.count() == 20  # one span per token
    for k in range(spans.count()):
        point_at(spans.nth(k))
        alternatives = sorted(lp["top_logprobs"][k].items(), key=lambda kv: -kv[1])
        check_tip(page.evaluate(TIP), lp["token_logprobs"][k], alternatives)
        assert page.locator("#token-tip li.chosen").count() == 1  # the legacy API lists the chosen token
    page.mouse.move(5, 5)
    assert page.is_hidden("#token-tip")
    # keyboard: one tab stop into the text, then arrow keys from token to token
    page.focus("#generate")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.classList.contains('tok')")
    assert page.evaluate("document.activeElement === document.querySelector('#out-text .tok')")
    check_tip(page.evaluate(TIP), lp["token_logprobs"][0], sorted(lp["top_logprobs"][0].items(), key=lambda kv: -kv[1]))
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    check_tip(page.evaluate(TIP), lp["token_logprobs"][2], sorted(lp["top_logprobs"][2].items(), key=lambda kv: -kv[1]))
    assert page.get_attribute("#out-text .tok:nth-child(3)", "aria-describedby") == "token-tip"
    page.keyboard.press("End")
    last = spans.count() - 1
    check_tip(page.evaluate(TIP), lp["token_logprobs"][last],
              sorted(lp["top_logprobs"][last].items(), key=lambda kv: -kv[1]))
    page.keyboard.press("Escape")
    assert page.is_hidden("#token-tip")


def test_chat_mode_tokens_show_their_probability_and_alternatives(browser, chat_server, chat_run, tmp_path):
    from quillgpt.chat import replies

    page, failed = open_page(browser, chat_server)
    page.fill("#temperature", "0.9")
    page.fill("#max_tokens", "16")
    page.fill("#seed", "3")
    page.fill("#message", "turn: heron")
    page.press("#message", "Enter")
    page.wait_for_function(IDLE, timeout=60_000)
    convo = [{"role": "user", "content": "turn: heron"}]
    reply = replies(chat_run.model, chat_run.tokenizer, [convo], max_new_tokens=16, temperature=0.9, seed=3)[0]
    assert bubbles(page) == [("user", "turn: heron"), ("assistant", reply)]
    spans = page.locator("#messages .assistant .tok")
    assert "".join(spans.all_text_contents()) == reply
    content = api(chat_server, "/v1/chat/completions", {
        "messages": convo, "max_tokens": 16, "temperature": 0.9, "seed": 3, "logprobs": True,
        "top_logprobs": 5})["choices"][0]["logprobs"]["content"]
    assert spans.all_text_contents() == [e["token"] for e in content]
    for k in range(spans.count()):
        point_at(spans.nth(k))
        check_tip(page.evaluate(TIP), content[k]["logprob"],
                  [(a["token"], a["logprob"]) for a in content[k]["top_logprobs"]])
    spans.nth(min(4, spans.count() - 1)).hover()
    screenshot(page, tmp_path, "chat-token-tip.png")
    # the reply keeps its tokens when the next one is regenerated
    page.fill("#message", "turn: stone")
    page.press("#message", "Enter")
    page.wait_for_function(IDLE, timeout=60_000)
    page.click("#regenerate")
    page.wait_for_function(IDLE, timeout=60_000)
    assert "".join(page.locator("#messages .assistant").first.locator(".tok").all_text_contents()) == reply
    assert failed == []
    page.close()


def test_a_tap_shows_a_tokens_tip_on_a_phone(browser, chat_server):
    page = browser.new_page(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True,
                            bypass_csp=True)
    page.goto(chat_server + "/", wait_until="domcontentloaded")
    page.fill("#max_tokens", "12")
    page.fill("#seed", "5")
    page.fill("#message", "turn: stone")
    page.press("#message", "Enter")
    page.wait_for_function(IDLE, timeout=60_000)
    spans = page.locator("#messages .assistant .tok")
    widths = [(spans.nth(k).bounding_box() or {"width": 0})["width"] for k in range(spans.count())]
    spans.nth(next(k for k, w in enumerate(widths) if w > 0)).tap()  # a newline has no width to tap
    tip = page.evaluate(TIP)
    assert not tip["hidden"] and len(tip["alts"]) == 5
    box = page.locator("#token-tip").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390  # on screen at phone width
    page.tap("#message")
    assert page.is_hidden("#token-tip")
    page.close()


@pytest.fixture(scope="module")
def bpe_server(tmp_path_factory):
    """A byte-level BPE model (random weights) whose tokens are often single bytes: pieces of
    characters (ü, é and — are two or three bytes)."""
    from conftest import make_any_run

    from quillgpt.config import ModelConfig
    from quillgpt.tokenizers.bpe import ByteBPETokenizer

    tok = ByteBPETokenizer.train("Über die Brücke, müde Grüße — naïve café.\n" * 30, 290)
    path = make_any_run(tmp_path_factory.mktemp("browser-bpe") / "bpe",
                        ModelConfig(block_size=128, n_layer=1, n_head=2, n_embd=32), tok)
    with BackgroundServer(create_app(load_run(path))) as url:
        yield url


def test_pieces_of_a_character_share_its_span(browser, bpe_server):
    page, failed = open_page(browser, bpe_server)
    page.fill("#prompt", "Grü")
    page.fill("#temperature", "1")
    page.fill("#top_k", "0")
    page.fill("#max_tokens", "60")
    page.fill("#seed", "4")
    page.click("#generate")
    page.wait_for_function("document.getElementById('generate').disabled === false "
                           "&& document.getElementById('stats').textContent.includes('tokens/s')", timeout=60_000)
    want = api(bpe_server, "/v1/completions", {"prompt": "Grü", "max_tokens": 60, "temperature": 1, "seed": 4,
                                               "logprobs": 5})["choices"][0]
    spans = page.locator("#out-text .tok")
    assert page.text_content("#out-text") == want["text"]
    assert "".join(spans.all_text_contents()) == want["text"]  # all of it in token spans
    tokens = [t for t in want["logprobs"]["tokens"] if t != "<|endoftext|>"]
    pieces = [t for t in tokens if t.startswith("bytes:")]
    assert pieces and spans.count() < len(tokens)  # some characters came in pieces, one span each
    sections = page.evaluate("""() => [...document.querySelectorAll('#out-text .tok')].map(s => {
        s.focus(); return document.querySelectorAll('#token-tip .tip-token').length; })""")
    assert sum(sections) == len(tokens) and max(sections) >= 2  # each piece has its part of the tip
    assert failed == []
    page.close()


# --- what a first visit meets: the icon, the card as people read it, hints that fit -------------

def test_the_page_asks_for_nothing_the_server_lacks(browser, server):
    """No 404 in the console on any load: the page names its icon (no /favicon.ico guess)."""
    page = browser.new_page()
    answers: list[tuple[str, int]] = []
    page.on("response", lambda r: answers.append((r.url, r.status)))
    messages: list[str] = []
    page.on("console", lambda m: messages.append(m.text) if m.type in ("error", "warning") else None)
    page.goto(server[0] + "/")
    page.wait_for_load_state("networkidle")
    icon = page.evaluate("() => document.querySelector('link[rel=icon]').href")
    assert page.request.get(icon).status == 200
    assert [a for a in answers if a[1] >= 400] == [] and messages == []
    assert not any(url.endswith("/favicon.ico") for url, _ in answers)
    page.close()


def card(page) -> dict[str, str]:
    return dict(zip(page.locator("#card dt").all_text_contents(), page.locator("#card dd").all_text_contents()))


def test_the_model_card_reads_as_words_and_says_which_limit_is_which(page, run):
    rows = card(page)
    assert not {"True", "False", "None"} & {w for v in rows.values() for w in v.replace("/", " ").split()}
    assert rows["dropout"] == "none" and rows["biases"] == "yes"  # the run: dropout 0.0, bias True
    assert rows["longest reply"] == "1,000,000 tokens (the server's cap)"
    assert "recommended" not in rows  # a run trained by quill train recommends nothing
    # the panel's Max tokens is this reply's, and the page says so next to it
    assert page.input_value("#max_tokens") == "200"
    note = page.text_content("#settings-note")
    assert "this reply" in note and "1000000" in note
    assert page.input_value("#temperature") == "0.8"


def test_a_chat_run_starts_at_its_recommended_temperature(browser, chat_server, chat_run):
    """quill sft writes sample_temperature 0 (greedy) into the run; the page starts there."""
    assert chat_run.config.train.sample_temperature == 0
    page, failed = open_page(browser, chat_server)
    assert page.input_value("#temperature") == "0"
    assert card(page)["recommended"] == "greedy (temperature 0)"
    assert failed == []
    page.close()


def test_the_phone_placeholder_names_no_keys_a_phone_lacks(browser, chat_server):
    phone = browser.new_page(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    phone.goto(chat_server + "/", wait_until="domcontentloaded")
    placeholder = phone.get_attribute("#message", "placeholder")
    assert "Shift" not in placeholder and placeholder.startswith("Message the model")
    phone.close()
    laptop, _ = open_page(browser, chat_server)
    assert "Shift+Enter" in laptop.get_attribute("#message", "placeholder")
    laptop.close()


def test_each_modes_status_line_stays_with_it(browser, chat_server):
    page, failed = open_page(browser, chat_server)
    page.click("#tab-complete")
    page.fill("#prompt", "turn")
    page.fill("#max_tokens", "8")
    page.click("#generate")
    page.wait_for_function("document.getElementById('generate').disabled === false "
                           "&& document.getElementById('stats').textContent.includes('tokens/s')", timeout=60_000)
    complete_stats = page.text_content("#stats")
    page.click("#tab-chat")
    assert page.is_hidden("#stats")  # Complete's figures are not Chat's
    page.click("#tab-complete")
    assert page.is_visible("#stats") and page.text_content("#stats") == complete_stats
    page.click("#tab-chat")
    page.fill("#message", "turn: stone")
    page.press("#message", "Enter")
    page.wait_for_function(IDLE, timeout=60_000)
    assert page.is_visible("#stats") and page.text_content("#stats") != complete_stats
    page.click("#tab-complete")
    assert page.is_hidden("#stats")
    assert failed == []
    page.close()


def test_server_side_tool_calls_show_collapsed_in_the_chat(browser, tmp_path):
    """`quill serve --tools calculator`: the model's calls and the results show in its bubble as
    collapsed, monospaced boxes before the answer; the history sent next holds the answer alone."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tool_models import ScriptedChat, tool_tokenizer

    from quillgpt.checkpoint import Run

    tok = tool_tokenizer()
    model = ScriptedChat(tok)
    cfg = load_config(None, {"vocab_size": tok.vocab_size, "block_size": model.config.block_size})
    app = create_app(Run(tmp_path / "calc", cfg, tok, model), ServeSettings(tools=("calculator",)))
    with BackgroundServer(app) as url:
        page, failed = open_page(browser, url)
        sent: list[dict] = []
        page.on("request", lambda r: sent.append(json.loads(r.post_data)) if "/v1/chat" in r.url else None)
        assert "tools run here" in page.inner_text("#card") and "calculator" in page.inner_text("#card")
        page.fill("#temperature", "0")
        page.fill("#message", "chain 12*34+5")
        page.press("#message", "Enter")
        page.wait_for_function(IDLE, timeout=60_000)
        reply = page.locator("#messages .msg.assistant .text")
        boxes = reply.locator("details.tool")
        assert boxes.count() == 4 and page.evaluate(
            "() => [...document.querySelectorAll('details.tool')].every(d => !d.open)")
        assert [boxes.nth(i).locator("summary").text_content() for i in range(4)] == [
            "tool call: calculator", "tool result", "tool call: calculator", "tool result"]
        assert page.evaluate("() => getComputedStyle(document.querySelector('details.tool')).fontFamily"
                             ).startswith("ui-monospace")
        assert page.evaluate("() => replyText(document.querySelector('#messages .msg.assistant .text'))") == "413"
        boxes.nth(0).locator("summary").click()
        assert boxes.nth(0).locator("pre").text_content() == 'calculator {"expression": "12*34"}'
        assert boxes.nth(1).locator("pre").is_hidden() and boxes.nth(3).locator("pre").text_content() == "413"
        screenshot(page, tmp_path, "chat-tools.png")
        page.fill("#message", "hi")
        page.press("#message", "Enter")
        page.wait_for_function(IDLE, timeout=60_000)
        assert sent[-1]["messages"][-3:] == [{"role": "user", "content": "chain 12*34+5"},
                                             {"role": "assistant", "content": "413"}, {"role": "user", "content": "hi"}]
        assert bubbles(page)[-1] == ("assistant", "you said hi")
        assert failed == []
        page.close()
