"""Talk to this persona in a real headless Chromium: its fake microphone plays the bundled caller
recording into the page, which plays Twilio's part against the real server (fake model); the
page's own audio code (μ-law, the resampler) checked against Python's."""

from __future__ import annotations

import contextlib
import re
import wave
from pathlib import Path

import numpy as np
import pytest
from console_kit import launched_chromium, screenshot, sign_in
from playwright.async_api import expect

from phoneagent.testing.speech import synthesize
from phoneagent.testing.wav import CALLER_BOOKING_WAV

DENTAL = "bright-smile-dental"
MIC_RATE = 48_000  # Chromium's capture rate; its fake device takes the file at this rate


def fake_microphone_file(path: Path, lead_s: float) -> Path:
    """The bundled caller recording (8 kHz) at 48 kHz, after ``lead_s`` of silence: a WAV for
    Chromium's fake microphone. Upsampled by zero-padding its spectrum (exact, band-limited)."""
    with wave.open(str(CALLER_BOOKING_WAV)) as recording:
        rate = recording.getframerate()
        samples = np.frombuffer(recording.readframes(recording.getnframes()), "<i2")
    factor = MIC_RATE // rate
    spectrum = np.fft.rfft(samples.astype(np.float64))
    padded = np.zeros(len(samples) * factor // 2 + 1, dtype=complex)
    padded[: len(spectrum)] = spectrum
    upsampled = np.fft.irfft(padded, len(samples) * factor) * factor
    audio = np.concatenate([np.zeros(int(lead_s * MIC_RATE)), upsampled])
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(MIC_RATE)
        out.writeframes(np.clip(np.round(audio), -32768, 32767).astype("<i2").tobytes())
    return path


@contextlib.asynccontextmanager
async def chromium_with_microphone(wav: Path):
    """A headless Chromium whose microphone plays ``wav`` once, then silence."""
    async with launched_chromium(
        f"--use-file-for-fake-audio-capture={wav}%noloop",
        "--autoplay-policy=no-user-gesture-required",
    ) as browser:
        yield browser


def counter(page, name: str):
    return page.evaluate(f"Number(document.getElementById('call-status').dataset.{name})")


async def test_a_call_from_the_browser_microphone_hears_the_greeting_and_shows_the_callers_words(
    console_stack, tmp_path
):
    greeting = console_stack.state.persona(DENTAL).greeting
    greeting_s = len(synthesize(greeting, sample_rate=8000)) / 2 / 8000
    # The caller speaks once the greeting has been heard out (no barge-in in this test).
    wav = fake_microphone_file(tmp_path / "caller.wav", lead_s=greeting_s + 4.0)
    async with chromium_with_microphone(wav) as browser:
        context = await browser.new_context(base_url=console_stack.base_url)
        page = await context.new_page()
        logs: list[str] = []
        page.on("console", lambda message: logs.append(message.text))
        await sign_in(page)
        await page.goto("/console/talk")
        await expect(page.get_by_label("Persona", exact=True)).to_have_value(DENTAL)
        await page.get_by_role("button", name="Start the call").click()
        status = page.locator("#call-status")
        await expect(status).to_have_attribute("data-state", "live")
        transcript = page.get_by_role("log")
        await expect(transcript).to_contain_text(greeting, timeout=15_000)
        # The greeting's audio arrived, played, and its marks were echoed as they played.
        await page.wait_for_function(
            "Number(document.getElementById('call-status').dataset.marksEchoed) > 0"
        )
        assert await counter(page, "framesReceived") > 20, logs
        assert await counter(page, "framesSent") > 0, logs
        # The fake model cannot understand speech: it says how long the caller spoke.
        caller_line = transcript.locator("li.caller")
        await expect(caller_line).to_contain_text(
            re.compile(r"\(caller spoke for \d\.\d s\)"), timeout=30_000
        )
        await expect(transcript.locator("li.agent")).to_have_count(2, timeout=15_000)
        await screenshot(page, "talk")
        await page.get_by_role("button", name="Hang up").click()
        await expect(status).to_have_attribute("data-state", "ended")
        await expect(status).to_contain_text("You hung up.")
        await context.close()
    call_sid = next(iter(console_stack.state.calls.ended())).call_sid
    record = console_stack.state.calls.get(call_sid)
    assert record.caller == "console" and record.end_reason == "caller_hung_up"
    spoke = float(re.search(r"spoke for (\d\.\d) s", record.transcript[1]["text"]).group(1))
    # The recording's speech is about 4 s long (it has 1.5 s of silence after it).
    assert 3.0 <= spoke <= 5.5


async def test_talking_over_the_greeting_clears_the_pages_playback(console_stack, tmp_path):
    """Barge-in, from the browser: the page echoes each mark when its audio has played (not
    when it arrives), so the server knows the caller has heard only the start of the greeting;
    its `clear` empties the page's playback and flushes the pending marks."""
    greeting = console_stack.state.persona(DENTAL).greeting
    wav = fake_microphone_file(tmp_path / "caller.wav", lead_s=2.5)
    async with chromium_with_microphone(wav) as browser:
        context = await browser.new_context(base_url=console_stack.base_url)
        page = await context.new_page()
        await sign_in(page)
        await page.goto("/console/talk")
        await page.get_by_role("button", name="Start the call").click()
        status = page.locator("#call-status")
        await expect(status).not_to_have_attribute("data-clears", "0", timeout=15_000)
        await expect(status).to_have_attribute("data-buffered-ms", "0")
        greeting_line = page.get_by_role("log").locator("li.agent").first
        await expect(greeting_line).to_contain_text("(interrupted)", timeout=15_000)
        await page.get_by_role("button", name="Hang up").click()
        await expect(status).to_have_attribute("data-state", "ended")
        await context.close()
    [record] = console_stack.state.calls.ended()
    assert record.stats["barge_ins"] >= 1
    heard = record.transcript[0]
    assert heard["interrupted"] and greeting.startswith(heard["text"])
    assert len(heard["text"]) < len(greeting)


# --- the page's audio code, against Python's ---------------------------------------------------

AUDIO_MODULE = "/console/static/talk-audio.js"


async def test_the_pages_mulaw_is_g711_bit_for_bit(page):
    import audioop

    await sign_in(page)
    await page.goto("/console/talk")
    encoded, decoded = await page.evaluate(
        """async (module) => {
            const audio = await import(module);
            const encoded = [];
            for (let s = -32768; s < 32768; s++) encoded.push(audio.encodeMulaw(s));
            const decoded = [];
            for (let b = 0; b < 256; b++) decoded.push(audio.decodeMulaw(b));
            return [encoded, decoded];
        }""",
        AUDIO_MODULE,
    )
    every_sample = np.arange(-32768, 32768, dtype="<i2").tobytes()
    assert bytes(encoded) == audioop.lin2ulaw(every_sample, 2)
    assert decoded == np.frombuffer(audioop.ulaw2lin(bytes(range(256)), 2), "<i2").tolist()


async def resample_tone(page, in_rate: int, out_rate: int, hz: float, seconds: float = 1.0):
    """A 0.5-amplitude tone at ``in_rate`` through the page's resampler, 128 samples at a time
    (as the audio thread feeds it); the output, and the same input in one block."""
    return await page.evaluate(
        """async ([module, inRate, outRate, hz, seconds]) => {
            const { Resampler } = await import(module);
            const input = Float32Array.from({ length: Math.round(inRate * seconds) },
                (_, n) => 0.5 * Math.sin(2 * Math.PI * hz * n / inRate));
            const blocks = new Resampler(inRate, outRate);
            const out = [];
            for (let i = 0; i < input.length; i += 128) {
                out.push(...blocks.process(input.subarray(i, i + 128)));
            }
            const whole = Array.from(new Resampler(inRate, outRate).process(input));
            return [out, whole];
        }""",
        [AUDIO_MODULE, in_rate, out_rate, hz, seconds],
    )


def level_db(samples: np.ndarray, hz: float, rate: int) -> float:
    """The level of the ``hz`` component (dB relative to the 0.5-amplitude input tone)."""
    n = np.arange(len(samples))
    window = np.hanning(len(samples))
    component = np.abs(np.sum(samples * window * np.exp(-2j * np.pi * hz * n / rate)))
    return 20 * np.log10(max(component / np.sum(window) * 2, 1e-12) / 0.5)


@pytest.mark.parametrize("mic_rate", [48_000, 44_100])
async def test_the_pages_downsampler_keeps_the_band_and_rejects_aliases(page, mic_rate):
    await sign_in(page)
    await page.goto("/console/talk")
    for hz in (300, 1000, 3000, 3400):
        out, whole = await resample_tone(page, mic_rate, 8000, hz)
        out = np.array(out)
        assert len(out) == pytest.approx(8000, abs=40)
        np.testing.assert_allclose(out[: len(whole)], whole[: len(out)], atol=1e-6)
        assert level_db(out[100:], hz, 8000) == pytest.approx(0, abs=0.3), hz  # the band
    for hz in (4600, 6000, 9000, 13000):  # would fold to 3.4, 2, 1 and 3 kHz
        out, _ = await resample_tone(page, mic_rate, 8000, hz)
        out = np.array(out[100:])
        alias = abs((hz + 4000) % 8000 - 4000)
        assert level_db(out, alias, 8000) < -75, hz
        assert 20 * np.log10(np.sqrt(np.mean(out**2)) / (0.5 / np.sqrt(2))) < -70, hz


async def test_the_pages_upsampler_leaves_no_images(page):
    await sign_in(page)
    await page.goto("/console/talk")
    out, _ = await resample_tone(page, 8000, 48_000, 1000)
    out = np.array(out[600:])
    assert level_db(out, 1000, 48_000) == pytest.approx(0, abs=0.3)
    for image in (7000, 9000, 15000, 17000):  # the 8 kHz spectrum's copies
        assert level_db(out, image, 48_000) < -75, image


BROKEN_DRAFT = """name = "Draft front desk"
default = true
language = "english"
voice = "linjiajiejie"
greeting = "Hello from the draft."
instructions = "You are a test."
[end_call]
goodbye = "Bye."
"""


async def test_a_draft_persona_is_checked_as_typed_and_its_errors_shown(page, console_stack):
    await sign_in(page)
    await page.goto("/console/talk")
    await page.get_by_label("Talk to a draft of this persona").check()
    draft = page.get_by_label("Draft persona file (TOML)")
    messages = page.locator("#draft-messages")
    # It starts from the persona's file, which passes.
    await expect(draft).to_have_value(re.compile(r'name = "Bright Smile Dental front desk"'))
    await expect(messages).to_have_text("No problems: Bright Smile Dental front desk")
    await draft.fill(BROKEN_DRAFT)
    path = console_stack.personas_dir / f"{DENTAL}.toml"  # as `personas check` names it
    problem = f"{path}: language: 'english' is not a language tag like en-US"
    await expect(messages.get_by_role("listitem")).to_have_text([problem])
    await screenshot(page, "draft-persona-error")
    # A call with it is refused before it starts, with the same message.
    await page.get_by_role("button", name="Start the call").click()
    await expect(page.locator("#call-status")).to_have_text(
        "The call could not start: the draft persona has problems."
    )
    await expect(messages.get_by_role("listitem")).to_have_text([problem])
    assert console_stack.model.sessions_opened == 0
    # Fixed, the draft is the persona the call talks to (nothing deployed).
    await page.get_by_role("button", name="Load the persona's file").click()
    await expect(messages).to_have_text("No problems: Bright Smile Dental front desk")
    text = await draft.input_value()
    await draft.fill(text.replace("this is Maya", "this is Robin, a draft"))
    await expect(messages).to_have_text("No problems: Bright Smile Dental front desk")
    await page.get_by_role("button", name="Start the call").click()
    await expect(page.get_by_role("log")).to_contain_text("this is Robin, a draft", timeout=15_000)
    await page.get_by_role("button", name="Hang up").click()
    await expect(page.locator("#call-status")).to_have_attribute("data-state", "ended")


async def test_signing_out_in_another_tab_ends_the_call_and_the_page_says_why(
    console_stack, tmp_path
):
    wav = fake_microphone_file(tmp_path / "caller.wav", lead_s=2.5)
    async with chromium_with_microphone(wav) as browser:
        context = await browser.new_context(base_url=console_stack.base_url)
        page = await context.new_page()
        await sign_in(page)
        await page.goto("/console/talk")
        await page.get_by_role("button", name="Start the call").click()
        status = page.locator("#call-status")
        await expect(status).to_have_attribute("data-state", "live", timeout=15_000)
        other_tab = await context.new_page()  # the same browser: the same session
        await other_tab.goto("/console/lines")
        await other_tab.get_by_role("button", name="Sign out", exact=True).click()
        await expect(other_tab).to_have_url("/console/login")
        await expect(status).to_have_attribute("data-state", "ended", timeout=5_000)
        await expect(status).to_contain_text("Your console session ended")
        await context.close()
    await console_stack.model.wait_for(lambda: console_stack.model.sessions_open == 0)
    [record] = console_stack.state.calls.ended()
    assert record.end_reason == "twilio_disconnected"
