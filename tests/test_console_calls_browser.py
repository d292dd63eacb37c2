"""Calls in a real headless Chromium: a call placed with the test kit appears under Live calls,
its page's transcript grows as the caller and the agent speak, and once it has ended, Recent
calls finds it and its page shows the transcript and its delivered webhook event."""

from __future__ import annotations

import asyncio

import pytest
from console_kit import screenshot, sign_in
from playwright.async_api import expect

from phoneagent.audio import pcm16_to_ulaw
from phoneagent.testing.fake_model import queued_transcripts
from phoneagent.testing.speech import synthesize

DENTAL = "+14155550100"
ANSWER = "Of course. We have a cleaning on Tuesday at ten. Shall I book it?"
HEARD = "I would like to book a cleaning, please."


@pytest.fixture
async def console_stack(hooked_console_stack):
    """The page and http fixtures on the stack whose dental line delivers to a webhook."""
    model = hooked_console_stack.model
    model.script = (ANSWER,)
    model.transcriber = queued_transcripts([HEARD])
    return hooked_console_stack


async def test_a_call_is_followed_live_and_found_afterwards_with_its_delivered_event(
    page, console_stack
):
    state = console_stack.state
    greeting = state.persona("bright-smile-dental").greeting
    await sign_in(page)
    async with console_stack.caller(to=DENTAL) as caller:
        await caller.dial()
        await caller.connect()
        caller.start_background_silence()
        assert await caller.post_stream_status("stream-started") == 204

        # Live calls: the list shows the call (the page refreshes itself), masked as the line
        # masks its callers.
        await page.get_by_role("link", name="Live calls").click()
        row = page.locator(f'#live-calls tr[data-call-sid="{caller.call_sid}"]')
        await expect(row).to_be_visible(timeout=10_000)
        await expect(row).to_contain_text("+*******0123")
        await expect(row).to_contain_text("Bright Smile Dental")
        await expect(row).to_contain_text("this instance")
        await expect(page.locator("#live-count")).to_have_text("1 call in progress")

        # Its page: the transcript grows as turns finish.
        await row.get_by_role("link").click()
        await expect(page).to_have_url(f"/console/calls/{caller.call_sid}")
        transcript = page.locator("#transcript")
        await expect(transcript.locator("li").first).to_contain_text(greeting, timeout=15_000)
        await expect(page.locator("#call-state")).to_have_text("talking")
        await caller.wait_until_quiet(300, timeout=20)
        await caller.play(pcm16_to_ulaw(synthesize(HEARD, sample_rate=8000)))
        await expect(transcript.locator("li")).to_have_count(3, timeout=20_000)
        await expect(transcript.locator("li").nth(1)).to_contain_text(HEARD)
        await expect(transcript.locator("li").nth(1).locator(".who")).to_have_text("Caller")
        await expect(transcript.locator("li").nth(2)).to_contain_text(ANSWER)
        await expect(page.locator("#call-duration")).not_to_have_text("")
        await screenshot(page, "live-call")
        await caller.wait_until_quiet(300, timeout=20)
        await caller.hangup()
        await expect(page.locator("#live-status")).to_contain_text(
            "The call ended: the caller hung up."
        )

    # The business's webhook got call.started and call.ended.
    received = await console_stack.sink.wait_for(2, timeout=20)
    # In either order: events are delivered concurrently (README, Delivery and retries).
    assert sorted(r.json["type"] for r in received) == ["call.ended", "call.started"]
    for _ in range(100):  # the worker marks the event delivered once the sink has answered
        items = await state.publisher.worker.outbox.for_call(caller.call_sid)
        if all(item.status == "delivered" for item in items):
            break
        await asyncio.sleep(0.05)

    # Recent calls: found by the caller's number, then its page.
    await page.get_by_role("link", name="Recent calls").click()
    await page.get_by_label("Number").fill("+1 415 555 0123")
    await page.get_by_label("Line").select_option(label="Bright Smile Dental front desk")
    await page.get_by_role("button", name="Search").click()
    await expect(page).to_have_url(
        "/console/calls?number=%2B1+415+555+0123&persona=bright-smile-dental&from=&to="
    )
    results = page.locator("#recent-calls tbody tr")
    await expect(results).to_have_count(1)
    await expect(results.first).to_contain_text("the caller hung up")
    await screenshot(page, "recent-calls")
    await results.first.get_by_role("link").click()
    await expect(page).to_have_url(f"/console/calls/{caller.call_sid}")
    await expect(page.get_by_role("heading", name="Call from +*******0123")).to_be_visible()
    turns = page.locator("#transcript li")
    await expect(turns).to_have_count(3)
    await expect(turns.nth(0)).to_contain_text(greeting)
    await expect(turns.nth(1)).to_contain_text(HEARD)
    await expect(page.locator("#end-reason")).to_contain_text("the caller hung up")
    await expect(page.locator("#stats")).to_contain_text("Time to first audio")
    await expect(page.locator("#twilio-events")).to_contain_text("stream-started")
    deliveries = page.locator("#deliveries tbody tr")
    await expect(deliveries).to_have_count(2)
    ended = deliveries.filter(has_text="call.ended")
    await expect(ended).to_contain_text("delivered")
    await expect(ended).to_contain_text(f"http://127.0.0.1:{console_stack.sink.port}")
    await expect(ended).to_contain_text("HTTP 204")
    await screenshot(page, "call")


async def test_a_transcript_holding_markup_is_shown_as_text(page, console_stack):
    from phoneagent.records import StreamEnded, StreamStarted

    call_sid = "CA" + "5" * 32
    text = '<script>document.title = "owned"</script><img src=x onerror=alert(1)>'
    turn = {"role": "caller", "text": text, "start_ms": 0, "end_ms": 10, "interrupted": False}
    state = console_stack.state
    state.calls.note(call_sid, StreamStarted(at=1.0, persona="bright-smile-dental",
                                             model_session="s", caller="+14155550123"))  # fmt: skip
    state.calls.note(call_sid, StreamEnded(at=2.0, end_reason="caller_hung_up",
                                           transcript=[turn], stats={}))  # fmt: skip
    await sign_in(page)
    await page.goto(f"/console/calls/{call_sid}")
    await expect(page.locator("#transcript li .text")).to_have_text(text)
    assert await page.locator("#transcript img").count() == 0
    assert "owned" not in await page.title()
