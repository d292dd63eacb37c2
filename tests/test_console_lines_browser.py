"""The lines and deliveries pages in a real headless Chromium: the example lines with their
transfer targets and webhook, a refused persona reload shown as ``personas check`` prints it,
and a dead letter redelivered from the page to a real receiver after a real call."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys

import pytest
from conftest import EXAMPLE_PERSONAS, PROJECT_ROOT
from console_kit import (
    accessibility_problems,
    check_accessibility,
    check_fits_phone,
    console_settings,
    screenshot,
    sign_in,
)
from playwright.async_api import expect

from phoneagent.delivery.status import DeliveryStatus
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.stack import LocalStack
from phoneagent.testing.webhook_sink import WebhookSink

DENTAL = "+14155550100"
SECRET_ENV = "CONSOLE_TEST_WEBHOOK_SECRET"
SECRET = "whsec_" + "c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cw=="
URL_TOKEN = "token-kept-out-of-pages"


@pytest.fixture
async def sink():
    async with WebhookSink([410]) as sink:  # 410 Gone: each event a dead letter at once
        yield sink


@pytest.fixture
def personas(tmp_path, sink, monkeypatch):
    """A copy of the examples, the dental line sending its events (caller masked) to the sink."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    directory = tmp_path / "personas"
    shutil.copytree(EXAMPLE_PERSONAS, directory)
    dental = directory / "bright-smile-dental.toml"
    dental.write_text(
        dental.read_text() + f'\n[webhook]\nurl = "{sink.url("/hooks")}?auth={URL_TOKEN}"\n'
        f'secret_env = "{SECRET_ENV}"\nevents = ["call.started", "call.ended"]\n'
        "mask_caller = true\n"
    )
    return directory


@pytest.fixture
async def console_stack(personas, tmp_path):
    """The console on a server of the personas above (the kit's ``page`` and ``http`` use it)."""
    model = FakeRealtimeServer(speed=None)
    settings = console_settings(personas, tmp_path / "data")
    async with LocalStack(personas, model=model, settings=settings) as stack:
        yield stack


async def test_the_lines_page_shows_each_line_with_its_transfers_webhook_and_limits(page, sink):
    await sign_in(page)
    await expect(page).to_have_url("/console/lines")
    dental = page.locator("#persona-bright-smile-dental")
    await expect(dental.get_by_role("heading", level=2)).to_have_text(
        "Bright Smile Dental front desk"
    )
    for text in [
        "+14155550100",
        "every number no other line claims",  # the default line
        "en-US",
        "linjiajiejie",
        "front_desk +14155550111",
        "A human receptionist: billing, insurance",
        "emergency +14155550199",
        "transfer to front_desk (+14155550111)",  # keypad 0
        "then transfer to front_desk",  # the fallback when busy
        sink.url("/hooks"),
        "call.started, call.ended",
        "masked (+*******0123)",
        f"the secret in ${SECRET_ENV}",
        "15 min (max_call_seconds)",
        "700 ms (silence_duration_ms)",
        "asked if still there after 20 s, hung up on 20 s later",
    ]:
        await expect(dental).to_contain_text(text)
    luca = page.locator("#persona-trattoria-luca")
    await expect(luca).to_contain_text("+14155550142, +14155550143")
    await expect(luca).to_contain_text("manager +14155550150")
    await expect(luca).to_contain_text("None: call events are not sent anywhere.")
    await expect(luca).to_contain_text("1400 (vad_threshold)")
    await expect(luca).to_contain_text("10 min (max_call_seconds)")
    clinic = page.locator("#persona-renxin-clinic")  # the Mandarin line: tone, upset callers
    await expect(clinic).to_contain_text("zh-CN")
    await expect(clinic).to_contain_text("亲切、耐心、沉稳")
    await expect(clinic).to_contain_text("to patient_relations, when the caller sounds angry")
    await expect(clinic).to_contain_text("spoken by Twilio's Polly.Zhiyu-Neural")
    html = await page.content()
    assert SECRET not in html and URL_TOKEN not in html  # the secret's name only; no query
    await expect(page.locator("#reload-problems")).to_have_count(0)
    await check_accessibility(page)
    await screenshot(page, "lines")
    await check_fits_phone(page)


async def test_a_refused_reload_shows_personas_checks_lines_and_the_lines_still_served(
    page, console_stack, personas
):
    await sign_in(page)
    luca = personas / "trattoria-luca.toml"
    good = luca.read_text()
    luca.write_text(  # the misspelt key first: the file ends in tables (its [[tools]])
        'voise = "x"\n'
        + good.replace('numbers = ["+14155550142", "+14155550143"]', 'numbers = ["555-0142"]')
    )
    registry = console_stack.state.personas
    async with asyncio.timeout(10):  # the stack's server looks every 0.2 s
        while registry.refused is None:
            await asyncio.sleep(0.05)
    check = subprocess.run(
        [sys.executable, "-m", "phoneagent.cli", "personas", "check", str(personas)],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=30,
    )  # fmt: skip
    assert check.returncode == 1
    printed = check.stdout.splitlines()
    assert any("numbers[0]: '555-0142' is not an E.164 number" in line for line in printed)
    assert any("voise: unknown key" in line for line in printed)

    await page.reload()
    problems = page.locator("#reload-problems")
    await expect(problems.get_by_role("heading")).to_have_text(
        "The last change to the persona files was refused"
    )
    shown = (await page.locator("#reload-errors").inner_text()).splitlines()
    assert shown == printed  # word for word what `phoneagent personas check` prints
    # Still serving the last good set: Luca's numbers as they were.
    await expect(page.locator("#persona-trattoria-luca")).to_contain_text("+14155550143")
    await check_accessibility(page)
    await screenshot(page, "lines-refused-reload")

    luca.write_text(good)
    async with asyncio.timeout(10):
        while registry.refused is not None:
            await asyncio.sleep(0.05)
    await page.reload()
    await expect(problems).to_have_count(0)


async def test_a_dead_letter_is_redelivered_from_the_deliveries_page(page, console_stack, sink):
    # A real call on the dental line: its call.started and call.ended are refused (410).
    async with console_stack.caller(to=DENTAL, speed=0) as caller:
        await caller.dial()
        await caller.connect()
        await caller.wait_for_event("media", timeout=20)
        await caller.hangup()
        await caller.wait_closed()
    outbox = console_stack.state.publisher.worker.outbox
    async with asyncio.timeout(15):
        while (await outbox.counts())[DeliveryStatus.FAILED] < 2:
            await asyncio.sleep(0.05)
    started, ended = sorted(sink.received, key=lambda r: r.json["type"] != "call.started")
    assert (started.json["type"], ended.json["type"]) == ("call.started", "call.ended")
    ended_id = ended.json["id"]

    await sign_in(page)
    await page.get_by_role("link", name="Deliveries").click()
    await expect(page).to_have_url("/console/deliveries")
    await expect(page.locator("#totals")).to_contain_text("0 pending, 2 dead letters")
    receiver = page.get_by_role("region", name=sink.base_url)
    await expect(receiver).to_contain_text("0 pending, 2 dead letters")
    row = receiver.locator(f"#event-{ended_id}")
    for text in ["call.ended", caller.call_sid, "HTTP 410 Gone", "UTC ("]:
        await expect(row).to_contain_text(text)
    await expect(row.get_by_role("cell").nth(3)).to_have_text("1")  # attempts
    await check_accessibility(page)
    await screenshot(page, "deliveries")
    await check_fits_phone(page)
    await screenshot(page, "deliveries-phone")

    sink.script([200])  # the receiver takes events again
    await row.get_by_role("button", name=f"Redeliver {ended_id}").click()
    await expect(page).to_have_url(f"/console/deliveries?queued={ended_id}")
    await expect(page.get_by_role("status")).to_contain_text(
        f"{ended_id} (call.ended) is queued again for {sink.url('/hooks')}"
    )
    received = await sink.wait_for(3, timeout=15)
    again = received[-1]
    assert (again.json["id"], again.status) == (ended_id, 200)
    assert again.body == ended.body  # the same event, byte for byte
    assert again.json["data"]["call_sid"] == caller.call_sid
    await page.reload()
    await expect(page.locator(f"#event-{ended_id}")).to_have_count(0)
    await expect(page.locator("#totals")).to_contain_text("0 pending, 1 dead letter,")
    await check_accessibility(page)


async def test_the_sign_in_page_is_accessible_too(page):
    await page.goto("/console/login")
    await check_accessibility(page)


async def test_the_accessibility_check_finds_what_it_looks_for(page):
    await page.set_content(
        """<!doctype html><html><body><main><h1>One</h1><h3>Skipped a level</h3>
        <input id="a"><input id="a" aria-label="named"><button></button><a href="#x"></a>
        <img src="data:,"><p style="color:#bbb">Faint text</p><h1>Two</h1></main>
        <main></main></body></html>"""
    )
    problems = "\n".join(await accessibility_problems(page))
    for expected in [
        "textbox with no accessible name",
        "button with no accessible name",
        "link with no accessible name",
        "image with no accessible name",
        "2 h1 headings",
        "2 main landmarks",
        "<html> has no lang",
        'id "a" is used twice',
        "heading levels skip: h1 then h3",
        'contrast 1.92:1 (needs 4.5:1): "Faint text"',
    ]:
        assert expected in problems, problems
