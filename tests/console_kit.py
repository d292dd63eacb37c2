"""The console's test kit: a server with the console on, and a real headless Chromium (Debian's
``chromium`` package, driven by Playwright; no browser is downloaded). Test modules import the
fixtures they use from here."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import aiohttp
import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.config import Settings
from phoneagent.testing.stack import LocalStack, demo_credentials

PASSWORD = "correct horse battery staple"
# The README's screenshots, retaken when PHONEAGENT_UPDATE_SCREENSHOTS=1 (a plain test run leaves
# the committed ones alone and writes its own to a temporary directory).
SCREENSHOTS = (
    Path(__file__).parents[1] / "docs" / "console"
    if os.environ.get("PHONEAGENT_UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "phoneagent-console-screenshots"
)


def chromium_path() -> str | None:
    return os.environ.get("PHONEAGENT_CHROMIUM") or shutil.which("chromium")


@pytest.fixture
async def console_stack(tmp_path):
    account_sid, auth_token = demo_credentials()
    settings = Settings(
        twilio_account_sid=account_sid,
        twilio_auth_token=auth_token,
        personas_dir=EXAMPLE_PERSONAS,
        data_dir=tmp_path / "data",
        console_password=PASSWORD,
    )
    async with LocalStack(EXAMPLE_PERSONAS, settings=settings) as stack:
        yield stack


@contextlib.asynccontextmanager
async def launched_chromium(*extra_args: str):
    """A headless Debian Chromium with a fake microphone and camera allowed without asking;
    ``extra_args`` add to its command line (a recording for the microphone…)."""
    from playwright.async_api import async_playwright

    path = chromium_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=path,
            args=[
                "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                *extra_args,
            ],
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def browser():
    """A headless Chromium (see launched_chromium)."""
    async with launched_chromium() as browser:
        yield browser


@pytest.fixture
async def page(browser, console_stack):
    context = await browser.new_context(base_url=console_stack.base_url)
    page = await context.new_page()
    yield page
    await context.close()


async def sign_in(page, password: str = PASSWORD) -> None:
    await page.goto("/console/lines")
    await page.get_by_label("Operator password").fill(password)
    await page.get_by_role("button", name="Sign in").click()


async def screenshot(page, name: str) -> None:
    """Take a screenshot for the README's Console section (docs/console/NAME.png when
    PHONEAGENT_UPDATE_SCREENSHOTS=1)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


@pytest.fixture
async def http(console_stack):
    """A plain HTTP client on the console's server (cookies kept, redirects not followed)."""
    async with aiohttp.ClientSession(
        base_url=console_stack.base_url, cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as session:
        yield session


def console_settings(personas_dir: Path, data_dir: Path, **overrides) -> Settings:
    """Settings of a server with the console on, for a stack of a test's own (its personas, a
    shared database: ``database_url=...``)."""
    account_sid, auth_token = demo_credentials()
    return Settings(
        twilio_account_sid=account_sid,
        twilio_auth_token=auth_token,
        personas_dir=personas_dir,
        data_dir=data_dir,
        console_password=PASSWORD,
        **overrides,
    )


# --- accessibility --------------------------------------------------------------------------

# Roles a person operates: each needs a name a screen reader can say, and the keyboard's focus.
_OPERABLE = {"button", "link", "textbox", "searchbox", "combobox", "listbox", "checkbox",
             "radio", "switch", "slider", "spinbutton", "menuitem", "tab"}  # fmt: skip

# What the accessibility tree does not say: the document's language, duplicate ids (labels and
# aria references then point at the wrong element), heading levels that skip, and text colour
# against its background (WCAG 2 AA: 4.5:1, 3:1 for large text).
_DOM_CHECKS = """() => {
  const problems = [];
  if (!document.documentElement.lang) problems.push("<html> has no lang");
  const seen = new Set();
  for (const el of document.querySelectorAll("[id]")) {
    if (seen.has(el.id)) problems.push(`id "${el.id}" is used twice`);
    seen.add(el.id);
  }
  let previous = 0;
  for (const h of document.querySelectorAll("h1, h2, h3, h4, h5, h6")) {
    const level = Number(h.tagName[1]);
    if (previous && level > previous + 1)
      problems.push(`heading levels skip: h${previous} then h${level} "${h.textContent.trim()}"`);
    previous = level;
  }
  const rgba = (text) => {
    const m = text.match(/rgba?\\(([^)]+)\\)/);
    if (!m) return null;
    const [r, g, b, a] = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number);
    return [r, g, b, a === undefined ? 1 : a];
  };
  const luminance = ([r, g, b]) => {
    const c = [r, g, b].map((v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
  };
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const bg = rgba(getComputedStyle(el).backgroundColor);
      if (bg && bg[3] >= 1) return bg;
    }
    return [255, 255, 255, 1];
  };
  for (const el of document.body.querySelectorAll("*")) {
    const text = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    const style = getComputedStyle(el);
    if (!text || style.visibility === "hidden" || !el.getClientRects().length) continue;
    const fg = rgba(style.color), bg = background(el);
    if (!fg) continue;
    const [l1, l2] = [luminance(fg), luminance(bg)].sort((a, b) => b - a);
    const ratio = (l1 + 0.05) / (l2 + 0.05);
    const size = parseFloat(style.fontSize), bold = Number(style.fontWeight) >= 700;
    const needed = size >= 24 || (bold && size >= 18.66) ? 3 : 4.5;
    if (ratio < needed)
      problems.push(`contrast ${ratio.toFixed(2)}:1 (needs ${needed}:1): ` +
                    `"${el.textContent.trim().slice(0, 40)}"`);
  }
  return problems;
}"""


async def accessibility_problems(page) -> list[str]:
    """What keeps the page from being used without sight or a mouse, from Chromium's own
    accessibility tree (the names a screen reader says) and the DOM: operable elements without
    a name or focus, not exactly one h1 and one main landmark, and the checks above."""
    cdp = await page.context.new_cdp_session(page)
    try:
        nodes = (await cdp.send("Accessibility.getFullAXTree"))["nodes"]
        problems: list[str] = []
        h1 = mains = 0
        for node in nodes:
            if node.get("ignored"):
                continue
            role = node.get("role", {}).get("value", "")
            name = str(node.get("name", {}).get("value", "")).strip()
            props = {p["name"]: p["value"].get("value") for p in node.get("properties", [])}
            if role == "heading" and props.get("level") == 1:
                h1 += 1
            mains += role == "main"
            unnamed = (role in _OPERABLE or role in ("image", "img")) and not name
            unfocusable = role in _OPERABLE and not props.get("focusable")
            if unnamed or unfocusable:
                html = await _outer_html(cdp, node.get("backendDOMNodeId"))
                what = "no accessible name" if unnamed else "cannot take keyboard focus"
                problems.append(f"{role} with {what}: {html}")
        if h1 != 1:
            problems.append(f"{h1} h1 headings: a page has exactly one")
        if mains != 1:
            problems.append(f"{mains} main landmarks: a page has exactly one")
    finally:
        await cdp.detach()
    return problems + await page.evaluate(_DOM_CHECKS)


async def _outer_html(cdp, backend_id: int | None) -> str:
    if backend_id is None:
        return "?"
    html = (await cdp.send("DOM.getOuterHTML", {"backendNodeId": backend_id}))["outerHTML"]
    return html[:120]


async def check_accessibility(page) -> None:
    """Fail the test, listing every problem, if the page has any (see accessibility_problems)."""
    problems = await accessibility_problems(page)
    assert not problems, f"{page.url}:\n" + "\n".join(problems)


PHONE = {"width": 360, "height": 740}  # a small phone screen, in CSS pixels


async def check_fits_phone(page) -> None:
    """Fail if the page, shown on a small phone screen, scrolls sideways (something too wide to
    read without it). The page is left at the phone's size: take phone screenshots after."""
    await page.set_viewport_size(PHONE)
    widths = await page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"{page.url} is {widths[0]} px wide on a {widths[1]} px phone"


# --- a console whose dental line sends its events to a webhook (Calls: delivered events) --------

HOOK_SECRET_ENV = "PHONEAGENT_CONSOLE_TEST_HOOK_SECRET"


def personas_with_webhook(directory: Path, url: str, *, mask_caller: bool = False) -> Path:
    """A copy of the example personas, the dental one sending every event type to ``url``
    (signed with the secret in ``HOOK_SECRET_ENV``), masking the caller if asked."""
    shutil.copytree(EXAMPLE_PERSONAS, directory)
    dental = directory / "bright-smile-dental.toml"
    dental.write_text(
        dental.read_text() + f'\n[webhook]\nurl = "{url}"\nsecret_env = "{HOOK_SECRET_ENV}"\n'
        'events = ["call.started", "call.transferred", "call.ended"]\n'
        f"mask_caller = {'true' if mask_caller else 'false'}\n"
    )
    return directory


@pytest.fixture
async def webhook_sink():
    """A loopback webhook receiver answering 204 (phoneagent.testing.webhook_sink)."""
    from phoneagent.testing.webhook_sink import WebhookSink

    async with WebhookSink([204]) as sink:
        yield sink


@pytest.fixture
async def hooked_console_stack(tmp_path, webhook_sink, monkeypatch):
    """``console_stack`` whose dental line (masking its callers) delivers its events to
    ``webhook_sink`` (``stack.sink``). A module uses it for ``page`` and ``http`` by defining
    ``console_stack`` as this fixture."""
    from phoneagent.delivery.signing import generate_secret

    monkeypatch.setenv(HOOK_SECRET_ENV, generate_secret())
    personas = personas_with_webhook(
        tmp_path / "personas", webhook_sink.url("/hooks/calls"), mask_caller=True
    )
    account_sid, auth_token = demo_credentials()
    settings = Settings(
        twilio_account_sid=account_sid,
        twilio_auth_token=auth_token,
        personas_dir=personas,
        data_dir=tmp_path / "data",
        console_password=PASSWORD,
    )
    async with LocalStack(personas, settings=settings) as stack:
        stack.sink = webhook_sink
        yield stack
