"""The console's test kit: a server with the console on, and a real headless Chromium (Debian's
``chromium`` package, driven by Playwright; no browser is downloaded). Test modules import the
fixtures they use from here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import aiohttp
import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.config import Settings
from phoneagent.testing.stack import LocalStack, demo_credentials

PASSWORD = "correct horse battery staple"
SCREENSHOTS = Path(__file__).parents[1] / "docs" / "console"


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


@pytest.fixture
async def browser():
    """A headless Chromium with a fake microphone and camera allowed without asking."""
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
            ],
        )
        try:
            yield browser
        finally:
            await browser.close()


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
    """Keep a screenshot for the README's Console section (docs/console/NAME.png)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


@pytest.fixture
async def http(console_stack):
    """A plain HTTP client on the console's server (cookies kept, redirects not followed)."""
    async with aiohttp.ClientSession(
        base_url=console_stack.base_url, cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as session:
        yield session


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
