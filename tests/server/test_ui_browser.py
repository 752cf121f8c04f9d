"""The chat page in a real headless browser: Chromium from the distribution's packages, driven by
Selenium through the system's chromedriver, both started here.

Skipped, saying what to install, where Chromium, chromedriver or Selenium is missing
(`apt-get install chromium chromium-driver`; Selenium comes with `pip install -e ".[test]"`).
`SHARDLINE_UI_SCREENSHOT=PATH` saves the page, as the slow test leaves it, to PATH (docs/ui.png
is made so).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
import pytest

from server.process import ServerProcess, fake_serve_command, server_process

MODEL = "smollm2-135m-instruct"
T = TypeVar("T")
# Text that would run code if any of it reached the page as HTML.
HOSTILE = [
    '<img src=x onerror="window.__pwned = 1">',
    "<script>window.__pwned = 1</script>",
    "**<img src=x onerror=window.__pwned=1>** and `<b>code</b>`",
    '[click](javascript:window.__pwned=1) [x](https://example.com/"onmouseover="window.__pwned=1)',
    '```html\n<iframe src="javascript:window.__pwned=1"></iframe>\n```',
    '<a href="javascript:alert(1)">a</a> &lt;b&gt; &amp; \u0000 0\u0000',
    "*<svg onload=window.__pwned=1>*",
]
ALLOWED_TAGS = {
    "P",
    "BR",
    "STRONG",
    "EM",
    "DEL",
    "CODE",
    "PRE",
    "SPAN",
    "UL",
    "OL",
    "LI",
    "BLOCKQUOTE",
    "HR",
    "H1",
    "H2",
    "H3",
    "H4",
    "H5",
    "H6",
    "A",
}


def _first(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


@contextmanager
def browser() -> Iterator[Any]:
    """A headless Chromium (the system's) under Selenium; skips the test if one is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("Selenium is not installed: pip install -e '.[test]' (or pip install selenium)")
    chromium = _first("chromium", "chromium-browser", "google-chrome")
    driver_path = _first("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(
            "no system Chromium and chromedriver for the browser test: "
            "apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,820",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(
    what: str, check: Callable[[], T | None], timeout_s: float = 60, period_s: float = 0.05
) -> T:
    end = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        time.sleep(period_s)


def text_of(driver: Any, element_id: str) -> str:
    return str(driver.execute_script(f"return document.getElementById('{element_id}').textContent"))


def last_answer(driver: Any) -> dict[str, Any]:
    """The last assistant message: its text, whether it is still streaming, its meta line."""
    return dict(
        driver.execute_script("""
        const all = document.querySelectorAll('.msg.assistant');
        const box = all[all.length - 1];
        if (!box) return {text: null, streaming: false, meta: ''};
        return {text: box.querySelector('.body').textContent, streaming: box.classList.contains('streaming'),
                meta: box.querySelector('.meta').textContent};
    """)
    )


def send(driver: Any, text: str) -> None:
    driver.execute_script("document.getElementById('prompt').value = arguments[0]", text)
    driver.execute_script("document.getElementById('composer').requestSubmit()")


def set_setting(driver: Any, element_id: str, value: str) -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input'))",
        element_id,
        value,
    )


def metrics(server: ServerProcess) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(server.base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("shardline:"):
            name = line.split("{")[0].split(" ")[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def assert_rendered_safely(driver: Any) -> None:
    """The page's renderer on hostile text: no element outside Markdown's few, no event-handler
    attribute, no link but http(s), and text without Markdown comes back character for character."""
    results = driver.execute_script(
        """
        return arguments[0].map((text) => {
            const div = document.createElement('div');
            div.innerHTML = window.shardline.renderMarkdown(text);
            const elements = [...div.querySelectorAll('*')];
            return {tags: elements.map((e) => e.tagName),
                    attrs: elements.flatMap((e) => [...e.attributes].map((a) => a.name + '=' + a.value)),
                    text: div.textContent};
        });
    """,
        HOSTILE,
    )
    for text, result in zip(HOSTILE, results, strict=True):
        assert set(result["tags"]) <= ALLOWED_TAGS, (text, result)
        for attr in result["attrs"]:
            name, _, value = attr.partition("=")
            assert not name.startswith("on"), (text, attr)
            assert name in {"href", "rel", "target", "class", "start"}, (text, attr)
            if name == "href":
                assert value.startswith(("http://", "https://")), (
                    text,
                    attr,
                )  # a quote in it stays in it
    assert results[0]["text"] == HOSTILE[0]
    assert results[1]["text"] == HOSTILE[1]
    assert results[4]["tags"] == ["PRE", "SPAN", "CODE"]
    assert '<iframe src="javascript:window.__pwned=1"></iframe>' in results[4]["text"]
    assert driver.execute_script("return window.__pwned") is None


@pytest.mark.slow
def test_chat_page_against_the_real_server(
    real_server: ServerProcess, tmp_path: pathlib.Path
) -> None:
    """Open the page on `shardline serve` (the default model): the status strip fills in; a
    message gets a streamed answer, seen growing poll after poll; Stop ends a long answer midway
    and the engine then runs nothing and holds no KV block; text carrying HTML, typed by the user
    or fed to the renderer, shows as text and runs nothing."""
    with browser() as driver:
        driver.get(real_server.base_url + "/")
        wait_for("the model's name", lambda: text_of(driver, "st-model") == MODEL)
        wait_for("the health item", lambda: text_of(driver, "st-health") == "healthy")
        wait_for(
            "the metrics",
            lambda: text_of(driver, "st-running") == "0" and text_of(driver, "st-kv") == "0.0%",
        )
        driver.find_element("id", "toggle-settings").click()
        set_setting(driver, "set-temperature", "0")
        set_setting(driver, "set-max-tokens", "400")

        # A long answer: watch it grow, then stop it.
        send(driver, "Write a very long story about a dragon.")
        lengths: list[int] = []

        def grown() -> bool:
            answer = last_answer(driver)
            assert answer["streaming"] or len(lengths) >= 8, (
                f"the answer ended before it could be stopped: {answer}"
            )
            n = len(answer["text"] or "")
            if n and (not lengths or n > lengths[-1]):
                lengths.append(n)
            return len(lengths) >= 8

        wait_for("the answer to grow", grown, timeout_s=120, period_s=0.02)
        assert lengths == sorted(set(lengths)) and lengths[0] < lengths[-1], lengths
        driver.find_element("id", "stop").click()
        answer = wait_for(
            "the stopped answer", lambda: (a := last_answer(driver)) and not a["streaming"] and a
        )
        assert "stopped" in answer["meta"], answer
        tokens = int(answer["meta"].split(" tokens")[0])
        assert 0 < tokens < 400, answer
        assert len(answer["text"]) >= lengths[-1], (answer, lengths)
        seen: dict[str, float] = {}

        def idle() -> bool:
            seen.update(metrics(real_server))
            return (
                seen["shardline:num_requests_running"] == 0
                and seen["shardline:kv_cache_blocks_used"] == 0
            )

        wait_for("the engine to drop the stopped request", idle, timeout_s=30, period_s=0.2)
        assert seen["shardline:num_requests_waiting"] == 0, seen
        wait_for("the page's running count", lambda: text_of(driver, "st-running") == "0")
        assert driver.find_element("id", "send").is_displayed()
        assert text_of(driver, "st-ttft").endswith("ms") or text_of(driver, "st-ttft").endswith(
            " s"
        )

        # HTML the user types is shown as text, Markdown around it rendered; nothing runs.
        driver.find_element("id", "new-chat").click()
        assert driver.execute_script("return document.querySelectorAll('.msg').length") == 0
        set_setting(driver, "set-max-tokens", "120")
        hostile = 'Repeat exactly: <img src=x onerror="window.__pwned=1"> and **bold**'
        send(driver, hostile)
        answer = wait_for(
            "the answer",
            lambda: (a := last_answer(driver)) and not a["streaming"] and a["meta"] and a,
        )
        assert "stopped" not in answer["meta"] and answer["text"], answer
        user = driver.execute_script("""
            const body = document.querySelector('.msg.user .body');
            return {text: body.textContent, imgs: document.querySelectorAll('#transcript img').length,
                    strong: [...body.querySelectorAll('strong')].map((e) => e.textContent)};
        """)
        assert user == {
            "text": hostile.replace("**bold**", "bold"),
            "imgs": 0,
            "strong": ["bold"],
        }, user
        assert driver.execute_script("return window.__pwned") is None
        assert_rendered_safely(driver)
        assert float(text_of(driver, "st-tps")) > 0
        # The conversation goes on (the picture in docs/ui.png shows it with a code block).
        send(driver, "Write a Python function that adds two numbers.")
        wait_for(
            "a second answer",
            lambda: (
                driver.execute_script("return document.querySelectorAll('.msg.assistant').length")
                == 2
                and not last_answer(driver)["streaming"]
            ),
        )
        assert last_answer(driver)["text"]
        wait_for("the page's running count", lambda: text_of(driver, "st-running") == "0")
        screenshot = os.environ.get("SHARDLINE_UI_SCREENSHOT")
        driver.find_element("id", "toggle-settings").click()  # closed again for the picture
        assert driver.get_screenshot_as_file(screenshot or str(tmp_path / "ui.png"))


@pytest.fixture(scope="module")
def keyed_fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`shardline serve --api-key` (from $SHARDLINE_API_KEY) with the fake engine: fast."""
    command = fake_serve_command("--served-model-name", "keyed-model")
    tmp = tmp_path_factory.mktemp("ui")
    with server_process(command, tmp, env={"SHARDLINE_API_KEY": "sk-browser"}) as server:
        server.wait_healthy(60)
        yield server
        assert server.stop() == 0


def test_the_renderer_writes_markdown_and_never_html(keyed_fake_server: ServerProcess) -> None:
    """The page's own renderer (and metrics parser), run in the browser: Markdown's subset
    becomes markup; HTML, javascript: links and entities in the text stay text."""
    with browser() as driver:
        driver.get(keyed_fake_server.base_url + "/")
        wait_for("the page's script", lambda: driver.execute_script("return !!window.shardline"))
        assert_rendered_safely(driver)

        def render(text: str) -> str:
            return str(
                driver.execute_script("return window.shardline.renderMarkdown(arguments[0])", text)
            )

        link = '<a href="https://e.com/x?a=1&amp;b=2" rel="noopener noreferrer nofollow" target="_blank">l</a>'
        cases = {
            "# Title": "<h1>Title</h1>",
            "- a\n- b": "<ul><li>a</li><li>b</li></ul>",
            "3. x\n4. y": '<ol start="3"><li>x</li><li>y</li></ol>',
            "> q <b>": "<blockquote>q &lt;b&gt;</blockquote>",
            "---": "<hr>",
            "one\ntwo\n\nthree": "<p>one<br>two</p><p>three</p>",
            "```py\nif a < b:\n    pass\n```\nafter": (
                '<pre><span class="lang">py</span><code>if a &lt; b:\n    pass</code></pre><p>after</p>'
            ),
            "```js\nlet x = '<i>'": '<pre><span class="lang">js</span><code>let x = &#39;&lt;i&gt;&#39;</code></pre>',
            "A **b** *i* `c <d>` [l](https://e.com/x?a=1&b=2) snake_case_name": (
                f"<p>A <strong>b</strong> <em>i</em> <code>c &lt;d&gt;</code> {link} snake_case_name</p>"
            ),
            "[x](javascript:alert(1))": "<p>[x](javascript:alert(1))</p>",
            "&amp; &lt;": "<p>&amp;amp; &amp;lt;</p>",
        }
        assert {text: render(text) for text in cases} == cases
        metrics_text = (
            "# HELP shardline:num_requests_running Number of requests.\n"
            'shardline:num_requests_running{engine="0",model_name="m"} 2.0\n'
            'shardline:num_requests_running{engine="1",model_name="m"} 1.0\n'
            'shardline:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        )
        parsed = driver.execute_script(
            "return window.shardline.parseMetrics(arguments[0])", metrics_text
        )
        assert parsed == {
            "shardline:num_requests_running": [2, 1],
            "shardline:kv_cache_usage_perc": [0.25],
        }


def test_the_page_asks_for_the_api_key(keyed_fake_server: ServerProcess) -> None:
    """With --api-key the page loads without it, asks for it, says when one is refused, and with
    the right one lists the model and chats; the key lives in the tab's sessionStorage only."""
    server = keyed_fake_server
    with browser() as driver:
        driver.get(server.base_url + "/")
        wait_for(
            "the key dialog",
            lambda: driver.execute_script("return document.getElementById('key-dialog').open"),
        )
        assert text_of(driver, "st-model") == "…"

        def submit_key(key: str) -> None:
            driver.execute_script(
                "document.getElementById('key-input').value = arguments[0];"
                "document.getElementById('key-form').requestSubmit()",
                key,
            )

        submit_key("wrong")
        wait_for(
            "the refusal",
            lambda: (
                "refused" in text_of(driver, "key-error")
                and driver.execute_script("return document.getElementById('key-dialog').open")
            ),
        )
        submit_key("sk-browser")
        wait_for("the model's name", lambda: text_of(driver, "st-model") == "keyed-model")
        assert (
            driver.execute_script("return sessionStorage.getItem('shardline.apiKey')")
            == "sk-browser"
        )
        assert driver.execute_script("return localStorage.getItem('shardline.apiKey')") is None
        set_setting(driver, "set-max-tokens", "9")
        send(driver, "hi")
        answer = wait_for(
            "the answer",
            lambda: (a := last_answer(driver)) and not a["streaming"] and a["meta"] and a,
        )
        assert answer["text"] == "The quick", answer  # the fake engine's first 9 characters
        assert "9 tokens" in answer["meta"] and "cut at max_tokens" in answer["meta"], answer
        # A setting the server refuses is shown, not dropped; the next request is served.
        set_setting(driver, "set-temperature", "-1")
        send(driver, "again")
        wait_for("the error", lambda: "temperature" in text_of(driver, "error"))
        set_setting(driver, "set-temperature", "")
        send(driver, "once more")
        wait_for(
            "the answer after the error",
            lambda: (
                last_answer(driver)["text"] == "The quick" and not last_answer(driver)["streaming"]
            ),
        )


def test_the_schema_box_sends_response_format(keyed_fake_server: ServerProcess) -> None:
    """A JSON schema in the settings goes out as response_format json_schema; text that is not
    a JSON object is shown as an error on the page and nothing is sent (the message is kept)."""
    server = keyed_fake_server
    with browser() as driver:
        driver.get(server.base_url + "/")
        driver.execute_script("sessionStorage.setItem('shardline.apiKey', 'sk-browser')")
        driver.refresh()
        wait_for("the model's name", lambda: text_of(driver, "st-model") == "keyed-model")
        driver.execute_script("""
            window.__sent = [];
            const original = window.fetch;
            window.fetch = (path, init) => {
                if (String(path).endsWith('/v1/chat/completions')) window.__sent.push(JSON.parse(init.body));
                return original(path, init);
            };
        """)
        set_setting(driver, "set-max-tokens", "9")
        set_setting(driver, "set-schema", '{"type": "object", oops}')
        send(driver, "as json")
        wait_for("the error", lambda: "not valid JSON" in text_of(driver, "error"))
        assert driver.execute_script("return window.__sent.length") == 0
        assert driver.execute_script("return document.getElementById('prompt').value") == "as json"
        assert driver.execute_script("return document.querySelectorAll('.msg').length") == 0
        set_setting(driver, "set-schema", "[1]")
        send(driver, "as json")
        wait_for("the error", lambda: "must be a JSON object" in text_of(driver, "error"))
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
        set_setting(driver, "set-schema", json.dumps(schema))
        send(driver, "as json")
        wait_for("the answer", lambda: (a := last_answer(driver)) and not a["streaming"] and a["meta"])
        sent = driver.execute_script("return window.__sent")
        assert len(sent) == 1 and sent[0]["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "schema", "schema": schema},
        }
        assert text_of(driver, "error") == ""
        set_setting(driver, "set-schema", "  ")
        send(driver, "free")
        wait_for("the second request", lambda: driver.execute_script("return window.__sent.length") == 2)
        assert "response_format" not in driver.execute_script("return window.__sent[1]")
