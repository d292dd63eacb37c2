"""``phoneagent doctor``: is this deployment ready for a real call?

It reads the configuration ``phoneagent serve`` reads and asks the real services: StepFun's
realtime API (the key, the model name, each persona's session, a spoken question, the greeting,
barge-in), Twilio's REST API (the credentials, each persona number's voice webhook) and our own
server through ``PUBLIC_URL`` (a webhook signed as Twilio signs it). Each check is a small
function returning :class:`Result`s; printing is separate (:func:`format_line`,
:func:`format_json`). It is a thin shell over the product's own pieces (``ModelConnector``, the
StepFun dialect, ``Call.begin()``, the caller audio pipeline, the ``twilio`` client), so what
passes here is what a call will do.

Every network step has a time limit (:class:`Limits`), and no secret reaches the output: results
are passed through :func:`redact` before anyone sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import unicodedata
import warnings
import wave
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from phoneagent.audio import CallerToModel, pcm16_rms, pcm16_to_ulaw
from phoneagent.audio.framing import FRAME_MS, ULAW_FRAME_BYTES, ULAW_SILENCE_FRAME
from phoneagent.call import Call, ToModel
from phoneagent.call.prompts import LANGUAGE_NAMES, session_config
from phoneagent.call.text_units import spans
from phoneagent.config import CREDENTIALS, ConfigError, Settings, is_local_host, load_settings
from phoneagent.personas import Persona, PersonaError, load_directory
from phoneagent.realtime.base import (
    AgentTranscriptDone,
    AppendAudio,
    AudioDelta,
    CancelResponse,
    ModelError,
    ModelEvent,
    ResponseDone,
    ResponseStarted,
    SessionConfig,
    TruncateItem,
)
from phoneagent.realtime.connection import (
    MODEL_NAME_REFUSALS,
    ModelConnectionLost,
    ModelConnector,
    ModelSession,
    ModelUnavailable,
)
from phoneagent.realtime.stepfun import MODEL_ALIASES

PASS, FAIL, WARN = "PASS", "FAIL", "WARN"
VOICE_PATH = "/twilio/voice"

# What StepFun's documented upgrade refusals mean for the operator (reference section 7).
HANDSHAKE_REFUSALS = {
    401: ("key rejected", "create a key at platform.stepfun.com and set STEPFUN_API_KEY to it"),
    402: ("no balance", "top up the StepFun account (platform.stepfun.com, billing)"),
    429: (
        "rate or concurrency limit",
        "calls in progress may be using every session the account allows: wait, or raise the "
        "limit with a top-up (StepFun's tiers); keep PHONEAGENT_MAX_CALLS below it",
    ),
    451: ("refused by content moderation", "ask StepFun support with the request id"),
}
# A question answered later than this after the caller stopped talking feels broken on a phone.
SLOW_FIRST_AUDIO_SECONDS = 3.0
# The bundled spoken questions, by language (see phoneagent/testing/assets/README.md).
QUESTIONS = {"en": "doctor_question_en.wav", "zh": "doctor_question_zh.wav"}
# A frame louder than this (pcm16 RMS) is speech: where the question ends, for the latency.
SPEECH_RMS = 300.0
# Made-up numbers for the signed webhook: Twilio's documented test "From" number.
PROBE_FROM = "+15005550006"


@dataclass(frozen=True)
class Result:
    status: str  # PASS, FAIL or WARN
    check: str  # what was checked, e.g. "stepfun key" or "twilio number +14155550100"
    detail: str  # what was found
    fix: str = ""  # how to fix it (FAIL and WARN)


def passed(check: str, detail: str) -> Result:
    return Result(PASS, check, detail)


def failed(check: str, detail: str, fix: str) -> Result:
    return Result(FAIL, check, detail, fix)


def warned(check: str, detail: str, fix: str) -> Result:
    return Result(WARN, check, detail, fix)


@dataclass(frozen=True)
class Limits:
    """Seconds each step may take, so doctor never hangs on a silent service."""

    connect: float = 10.0  # a WebSocket upgrade plus session.update, or one REST request
    greeting: float = 30.0  # the greeting response, start to end
    answer: float = 20.0  # from the end of the question to the answer's first audio
    cancel: float = 5.0  # response.cancel to its response.done
    refusal: float = 1.5  # how long an error answering truncate may take to arrive


# --- configuration ---------------------------------------------------------------------------


def load_configuration(environ: Mapping[str, str]) -> tuple[Settings, list[Result]]:
    """The settings ``serve`` would use, and a FAIL per problem. Unlike ``serve``, doctor goes
    on without the broken variables, so one run reports everything it can check."""
    try:
        return load_settings(environ), []
    except ConfigError as exc:
        problems = exc.problems
    # Every problem line starts with the variable's name (config.py).
    broken = {problem.split(" ", 1)[0] for problem in problems}
    results = [
        failed(f"config {name}", problem, _config_fix(name, problem))
        for problem in problems
        for name in [problem.split(" ", 1)[0]]
    ]
    usable = {k: v for k, v in environ.items() if k not in broken}
    try:
        return load_settings(usable, require_credentials=False), results
    except ConfigError:  # cannot happen as config.py stands; stay useful if it changes
        return Settings(), results


def _config_fix(name: str, problem: str) -> str:
    if "is not set" in problem and name in CREDENTIALS:
        return f"set {name}: {CREDENTIALS[name]}"
    if name == "PUBLIC_URL":
        return (
            "Twilio streams only to wss://: serve behind https (a tunnel such as ngrok for a trial)"
        )
    return f"correct {name} in the environment (README, Configuration)"


def load_personas(directory: Path) -> tuple[list[Persona], list[Result]]:
    try:
        personas = sorted(load_directory(directory).personas.values(), key=lambda p: p.id)
    except PersonaError as exc:
        fix = f"run `phoneagent personas check {directory}` and correct the file"
        return [], [failed("personas", str(problem), fix) for problem in exc.problems]
    ids = ", ".join(p.id for p in personas)
    return personas, [passed("personas", f"{len(personas)} loaded from {directory}: {ids}")]


# --- StepFun -----------------------------------------------------------------------------------


def _handshake_failed(exc: ModelUnavailable) -> bool:
    """True when the WebSocket upgrade itself failed (refused or unreachable), as opposed to the
    session set-up after it. ``ModelUnavailable`` has no field for the stage; its status is set
    only for refusals and its reason starts "cannot connect" only when nothing answered."""
    return exc.status is not None or str(exc).startswith("cannot connect")


async def check_stepfun_access(
    settings: Settings, probe: SessionConfig, limits: Limits
) -> tuple[list[Result], ModelConnector | None]:
    """The key and the model name, from one upgrade (with the product's alias fallback).

    Returns the connector to reuse (it then goes straight to the name that works; the caller
    closes it), or None when no session can be opened at all."""
    connector = ModelConnector(
        url=settings.stepfun_realtime_url,
        api_key=settings.stepfun_api_key,
        model=settings.stepfun_model,
        open_timeout=limits.connect,
    )
    try:
        results = await _stepfun_access(connector, settings, probe, limits)
    except BaseException:
        await connector.close()
        raise
    if results[-1].status == FAIL:
        await connector.close()
        return results, None
    return results, connector


async def _stepfun_access(
    connector: ModelConnector, settings: Settings, probe: SessionConfig, limits: Limits
) -> list[Result]:
    configured = settings.stepfun_model
    alias = MODEL_ALIASES.get(configured)
    tried = f"{configured!r}" + (f" and its alias {alias!r}" if alias else "")
    try:
        async with asyncio.timeout(3 * limits.connect):
            session = await connector.open(probe)
        await session.close()
    except TimeoutError:
        fix = "check STEPFUN_REALTIME_URL and that this machine reaches it"
        return [failed("stepfun connect", f"no answer within {3 * limits.connect:.0f} s", fix)]
    except ModelUnavailable as exc:
        if exc.status is None and _handshake_failed(exc):
            fix = "check STEPFUN_REALTIME_URL, DNS and the firewall (outbound wss on 443)"
            return [failed("stepfun connect", f"{settings.stepfun_realtime_url}: {exc}", fix)]
        if exc.status in HANDSHAKE_REFUSALS:
            what, fix = HANDSHAKE_REFUSALS[exc.status]
            return [failed("stepfun key", f"{what} (HTTP {exc.status})", fix)]
        if exc.status in MODEL_NAME_REFUSALS:
            key = passed("stepfun key", "not refused (the model name was)")
            fix = (
                "set STEPFUN_MODEL to a realtime model the account may use "
                "(StepFun's docs: stepaudio-2.5-realtime)"
            )
            detail = f"model name refused (HTTP {exc.status}): tried {tried}"
            return [key, failed("stepfun model", detail, fix)]
        if exc.status is not None:
            fix = "StepFun had a problem: try again later; if it persists, ask StepFun support"
            detail = f"the upgrade was refused with HTTP {exc.status}"
            return [failed("stepfun connect", detail, fix)]
        # The upgrade worked; the session was refused: each persona's check will say why.
    results = [passed("stepfun key", "accepted")]
    if connector.model == configured:
        results.append(passed("stepfun model", f"{configured!r} accepted"))
    else:
        detail = f"{configured!r} refused; only its alias {connector.model!r} accepted"
        fix = f"set STEPFUN_MODEL={connector.model} (each call otherwise pays a refused upgrade)"
        results.append(warned("stepfun model", detail, fix))
    return results


class _EventPump:
    """A session's events in a queue, so each step can wait for them with its own time limit
    (cancelling a read on the events generator itself would end it)."""

    def __init__(self, session: ModelSession):
        self.queue: asyncio.Queue[ModelEvent | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(session))

    async def _pump(self, session: ModelSession) -> None:
        try:
            async for event in session.events():
                self.queue.put_nowait(event)
        finally:
            self.queue.put_nowait(None)

    async def next(self) -> ModelEvent:
        event = await self.queue.get()
        if event is None:
            self.queue.put_nowait(None)  # stays closed for later readers
            raise ConnectionError("the model closed the session")
        return event

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def check_persona_model(
    connector: ModelConnector, persona: Persona, limits: Limits, speed: float | None = 1.0
) -> list[Result]:
    """One model session configured as a call of ``persona`` would be, then the greeting, a
    spoken question, and the barge-in commands."""
    name = f"[{persona.id}]"
    try:
        async with asyncio.timeout(limits.connect * 3):
            session = await connector.open(session_config(persona))
    except (ModelUnavailable, TimeoutError) as exc:
        reason = str(exc) or f"no answer within {limits.connect * 3:.0f} s"
        fix = (
            f"check voice {persona.voice!r} (it must exist for model {connector.model}) and the "
            f"persona's tools in {persona.source or persona.id}"
        )
        detail = reason if reason.startswith("session refused") else f"refused: {reason}"
        return [failed(f"stepfun session {name}", detail, fix)]
    tools = len(session_config(persona).tools)
    results = [passed(f"stepfun session {name}", f"voice {persona.voice!r} and {tools} tool(s)")]
    pump = _EventPump(session)
    try:
        results.append(await _check_greeting(session, pump, persona, limits))
        results += await _check_answer_and_barge_in(session, pump, persona, limits, speed)
    finally:
        await pump.close()
        await session.close()
    return results


async def _check_greeting(
    session: ModelSession, pump: _EventPump, persona: Persona, limits: Limits
) -> Result:
    """The greeting, sent exactly as a call sends it (``Call.begin()``), said word for word?"""
    check = f"stepfun greeting [{persona.id}]"
    call = Call(persona=persona, stream_sid="MZdoctor", call_sid=probe_call_sid())
    for action in call.begin():
        if isinstance(action, ToModel):
            await session.send(action.command)
    response_id, said, audio_bytes = None, "", 0
    try:
        async with asyncio.timeout(limits.greeting):
            while True:
                event = await pump.next()
                if isinstance(event, ResponseStarted) and response_id is None:
                    response_id = event.response_id
                elif isinstance(event, AudioDelta) and event.response_id == response_id:
                    audio_bytes += len(event.pcm)
                elif isinstance(event, AgentTranscriptDone) and event.response_id == response_id:
                    said += event.text
                elif isinstance(event, ResponseDone) and event.response_id == response_id:
                    break
                elif isinstance(event, ModelError) and not event.benign:
                    fix = "the greeting request was refused: see the message; report it to us"
                    return failed(check, f"error: {event.code} {event.message}", fix)
    except TimeoutError:
        fix = "StepFun is slow or stalled; run doctor again, and check StepFun's status"
        return failed(check, f"no complete greeting within {limits.greeting:.0f} s", fix)
    except ConnectionError as exc:
        return failed(check, str(exc), "run doctor again; if it persists, ask StepFun support")
    if not audio_bytes:
        fix = "the model answered without audio: check the model name (STEPFUN_MODEL)"
        return failed(check, "the greeting had no audio", fix)
    seconds = audio_bytes / 2 / session.dialect.output_rate
    if normalise(said) == normalise(persona.greeting):
        return passed(check, f"said word for word ({seconds:.1f} s of audio)")
    fix = (
        "the model rephrases the greeting: shorten it or simplify its wording in "
        f"{persona.source or persona.id}, and run doctor again (it may vary between runs)"
    )
    return warned(check, f'said "{said}" instead of "{persona.greeting}"', fix)


def normalise(text: str) -> str:
    """Case, punctuation and spacing aside, the words, or the characters of a script written
    without spaces: "您好 金龙餐厅" and "您好金龙餐厅。" read the same."""
    kept = "".join(" " if unicodedata.category(c)[0] in "PZ" else c for c in text.casefold())
    return " ".join(kept[start:end] for start, end in spans(kept))


def question_for(language: str) -> tuple[str, Path]:
    """The bundled question in the persona's language (English when we have none for it)."""
    code = language.split("-")[0].lower()
    code = code if code in QUESTIONS else "en"
    asset = resources.files("phoneagent.testing") / "assets" / QUESTIONS[code]
    return LANGUAGE_NAMES[code], Path(str(asset))


def caller_frames(wav_path: Path) -> tuple[list[bytes], int]:
    """The WAV as Twilio would send it (20 ms μ-law frames), and the index of the frame after
    the last one with speech (the caller stopped talking there)."""
    with wave.open(str(wav_path)) as reader:
        pcm = reader.readframes(reader.getnframes())
    ulaw = pcm16_to_ulaw(pcm)
    frames = [ulaw[i : i + ULAW_FRAME_BYTES] for i in range(0, len(ulaw), ULAW_FRAME_BYTES)]
    step = 2 * ULAW_FRAME_BYTES
    loud = [i for i in range(len(frames)) if pcm16_rms(pcm[i * step : (i + 1) * step]) > SPEECH_RMS]
    return frames, (loud[-1] + 1 if loud else len(frames))


async def _check_answer_and_barge_in(
    session: ModelSession,
    pump: _EventPump,
    persona: Persona,
    limits: Limits,
    speed: float | None,
) -> list[Result]:
    """Say the question as a caller would (20 ms frames through the product's caller audio
    pipeline, at the line's pace, silence after it as on a live line); time the answer's first
    audio; then interrupt it as a barge-in does (response.cancel, conversation.item.truncate)."""
    answer = f"stepfun answer [{persona.id}]"
    language, wav = question_for(persona.language)
    frames, speech_end = caller_frames(wav)
    caller = _Caller(session, frames, speech_end, speed)
    speaking = asyncio.create_task(caller.speak())
    first: AudioDelta | None = None
    try:
        async with asyncio.timeout(limits.answer + caller.seconds):
            while first is None:
                event = await pump.next()
                if isinstance(event, AudioDelta):
                    first = event
                elif isinstance(event, ModelError) and not event.benign:
                    fix = "the model refused the caller's audio: see the message"
                    return [failed(answer, f"error: {event.code} {event.message}", fix)]
    except TimeoutError:
        fix = (
            f"the model did not hear the caller: lower vad_threshold ({persona.vad_threshold}) "
            f"in {persona.source or persona.id}, or check StepFun's status"
        )
        detail = f"no spoken answer to the {language} question within {limits.answer:.0f} s"
        return [failed(answer, detail, fix)]
    except ConnectionError as exc:
        return [failed(answer, str(exc), "run doctor again; if it persists, ask StepFun support")]
    finally:
        speaking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await speaking
    # An answer that starts before the caller finished counts as no wait at all.
    waited = max(0.0, time.monotonic() - (caller.stopped_at or time.monotonic()))
    detail = (
        f"answered the {language} question with audio {waited:.1f} s after the caller stopped "
        f"(including {persona.silence_duration_ms} ms of silence that ends the turn)"
    )
    results = [passed(answer, detail)]
    if waited > SLOW_FIRST_AUDIO_SECONDS:
        fix = (
            "callers will wait that long for every answer: run doctor near the server, check "
            "the latency to StepFun, and keep silence_duration_ms short"
        )
        results = [warned(answer, detail, fix)]
    results += await _check_barge_in(session, pump, persona, first, limits)
    return results


class _Caller:
    """Streams the question, then silence, as Twilio streams a caller: 20 ms μ-law frames
    through the product's caller audio pipeline, at the line's pace (``speed`` times real time;
    None: as fast as possible). ``stopped_at``: when the last frame of speech was sent."""

    def __init__(
        self, session: ModelSession, frames: list[bytes], speech_end: int, speed: float | None
    ):
        self.session, self.frames, self.speech_end, self.speed = session, frames, speech_end, speed
        self.stopped_at: float | None = None

    @property
    def seconds(self) -> float:
        """Wall time the question takes to send."""
        return 0.0 if self.speed is None else len(self.frames) * FRAME_MS / 1000 / self.speed

    async def speak(self) -> None:
        to_model = CallerToModel(self.session.dialect.input_rate)
        start, index = time.monotonic(), 0
        with contextlib.suppress(ModelConnectionLost):  # the event side reports it
            while True:
                frame = self.frames[index] if index < len(self.frames) else ULAW_SILENCE_FRAME
                await self.session.send(AppendAudio(to_model.process(frame)))
                index += 1
                if index == self.speech_end:
                    self.stopped_at = time.monotonic()
                if self.speed is None:
                    await asyncio.sleep(0)
                else:
                    due = start + index * FRAME_MS / 1000 / self.speed
                    await asyncio.sleep(max(0.0, due - time.monotonic()))


async def _check_barge_in(
    session: ModelSession, pump: _EventPump, persona: Persona, first: AudioDelta, limits: Limits
) -> list[Result]:
    """The two commands a barge-in sends, in the product's order, each accepted?"""
    cancel, truncate = f"stepfun cancel [{persona.id}]", f"stepfun truncate [{persona.id}]"
    keeps = "barge-in still works (Twilio's clear stops the audio at once), but"
    await session.send(CancelResponse())
    results: list[Result] = []
    try:
        async with asyncio.timeout(limits.cancel):
            while True:
                event = await pump.next()
                if isinstance(event, ResponseDone) and event.response_id == first.response_id:
                    results.append(passed(cancel, f"response.cancel accepted ({event.status})"))
                    break
                if isinstance(event, ModelError):
                    if "no ongoing response" in event.message:
                        fix = "the answer ended before the cancel arrived: run doctor again"
                        results.append(warned(cancel, "could not be tried", fix))
                    else:
                        fix = f"{keeps} the model goes on generating the interrupted answer"
                        detail = f"response.cancel refused: {event.code} {event.message}"
                        results.append(warned(cancel, detail, fix))
                    break
    except TimeoutError:
        fix = f"{keeps} the model may go on generating the interrupted answer"
        results.append(warned(cancel, f"no response.done within {limits.cancel:.0f} s", fix))
    except ConnectionError as exc:
        return [*results, failed(cancel, str(exc), "run doctor again")]
    heard_ms = max(1, round(len(first.pcm) / 2 / session.dialect.output_rate * 1000))
    await session.send(TruncateItem(first.item_id, heard_ms))
    try:
        async with asyncio.timeout(limits.refusal):
            while True:
                event = await pump.next()
                if isinstance(event, ModelError):  # the dialect calls it benign: we do not
                    fix = (
                        f"{keeps} the model keeps the text of the answer the caller did not hear "
                        "(it may refer to it later); nothing to configure"
                    )
                    detail = f"conversation.item.truncate refused: {event.code} {event.message}"
                    return [*results, warned(truncate, detail, fix)]
    except TimeoutError:
        pass  # no refusal: accepted (the dialect does not surface the acknowledgement)
    except ConnectionError as exc:
        return [*results, failed(truncate, str(exc), "run doctor again")]
    return [*results, passed(truncate, "conversation.item.truncate accepted")]


# --- Twilio ------------------------------------------------------------------------------------


def twilio_client(settings: Settings) -> Client:
    """The ``twilio`` client at ``TWILIO_API_BASE_URL``, as ``twilio/rest/calls.py`` makes it."""
    http = AsyncTwilioHttpClient(pool_connections=False)
    client = Client(settings.twilio_account_sid, settings.twilio_auth_token, http_client=http)
    client.api.base_url = settings.twilio_api_base_url  # read on every request
    return client


async def _twilio_request(awaitable, limits: Limits):
    async with asyncio.timeout(limits.connect):
        with warnings.catch_warnings():
            # twilio's async client still uses aiohttp.BasicAuth, deprecated in aiohttp 3.14.
            warnings.simplefilter("ignore", DeprecationWarning)
            return await awaitable


def _twilio_failure(check: str, exc: BaseException, settings: Settings) -> Result:
    if isinstance(exc, TwilioRestException):
        if exc.status == 401:
            fix = (
                "copy the Account SID and Auth Token from console.twilio.com into "
                "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN (the same account that owns the numbers)"
            )
            return failed(check, "SID or token wrong (HTTP 401)", fix)
        detail = f"Twilio answered HTTP {exc.status}, error {exc.code}: {exc.msg}"
        return failed(check, detail, f"see https://www.twilio.com/docs/errors/{exc.code}")
    if isinstance(exc, TimeoutError):
        detail = f"no answer from {settings.twilio_api_base_url} within the time limit"
    else:
        detail = f"cannot reach {settings.twilio_api_base_url}: {type(exc).__name__}: {exc}"
    return failed(check, detail, "check TWILIO_API_BASE_URL and this machine's network")


TWILIO_ERRORS = (TwilioRestException, TimeoutError, aiohttp.ClientError, OSError)


async def check_twilio_account(client: Client, settings: Settings, limits: Limits) -> Result:
    check = "twilio account"
    try:
        account = await _twilio_request(
            client.api.v2010.accounts(settings.twilio_account_sid).fetch_async(), limits
        )
    except TWILIO_ERRORS as exc:
        return _twilio_failure(check, exc, settings)
    # The resource carries the auth token: only these two fields are read from it.
    if account.status != "active":
        fix = "reactivate the account in console.twilio.com (billing), or use an active one"
        return failed(check, f"the account is {account.status}", fix)
    if account.type == "Trial":
        fix = "upgrade the account: on a trial, every caller first hears Twilio's trial notice"
        return warned(check, "SID and token accepted; this is a trial account", fix)
    return passed(check, "SID and token accepted")


async def check_number(
    client: Client, number: str, persona: Persona, settings: Settings, limits: Limits
) -> Result:
    """The number is on the account and sends its calls to our voice webhook, by POST."""
    check = f"twilio number {number} [{persona.id}]"
    try:
        found = await _twilio_request(
            client.incoming_phone_numbers.list_async(phone_number=number, limit=20), limits
        )
    except TWILIO_ERRORS as exc:
        return _twilio_failure(check, exc, settings)
    # The filter matches partial numbers: keep the exact one.
    match = next((n for n in found if n.phone_number == number), None)
    if match is None:
        fix = (
            f"buy or port {number} on this account (or its subaccount's SID), or correct "
            f"`numbers` in {persona.source or persona.id}"
        )
        return failed(check, "not a number of this Twilio account", fix)
    expected = settings.public_url + VOICE_PATH if settings.public_url else ""
    where = f"console.twilio.com → Phone Numbers → {number} → Voice configuration"
    if match.voice_application_sid:
        fix = f"{where}: configure with a Webhook (not a TwiML App): {expected or 'PUBLIC_URL'}"
        detail = f"calls go to TwiML App {match.voice_application_sid}, not to the webhook"
        return failed(check, detail, fix)
    if expected and match.voice_url != expected:
        fix = f'{where}: "A call comes in" → Webhook {expected}, HTTP POST'
        return failed(check, f"voice URL is {match.voice_url!r}, not {expected}", fix)
    if (match.voice_method or "").upper() != "POST":
        fix = f'{where}: "A call comes in" → HTTP POST'
        return failed(check, f"voice method is {match.voice_method!r}, not POST", fix)
    return passed(check, f"on the account; calls POST {match.voice_url}")


def check_public_url(public_url: str) -> Result:
    """``load_settings`` refuses http for anything but localhost; that is a config FAIL."""
    check = "twilio public url"
    parts = urlsplit(public_url)
    if parts.scheme == "https":
        return passed(check, f"{public_url} is https")
    if is_local_host(parts.hostname):
        fix = "Twilio cannot reach localhost: for real calls set PUBLIC_URL to a public https URL"
        return warned(check, f"{public_url} is local (fine for `phoneagent demo` only)", fix)
    fix = "Twilio streams only to wss://: serve behind https and set PUBLIC_URL to that URL"
    return failed(check, f"{public_url} is not https", fix)


def probe_call_sid() -> str:
    """A made-up CallSid, recognisable in the server's logs ("d0c7" for doctor)."""
    return "CAd0c7" + secrets.token_hex(14)


async def check_voice_webhook(settings: Settings, number: str, limits: Limits) -> Result:
    """Our server, through PUBLIC_URL, answers a webhook signed as Twilio signs it with TwiML.

    Side effect on a live server: it pre-warms a model session for this made-up call, which
    is closed unused 15 s later (README, "Before the first real call")."""
    check = "twilio voice webhook"
    url = settings.public_url + VOICE_PATH
    params = {
        "AccountSid": settings.twilio_account_sid,
        "ApiVersion": "2010-04-01",
        "CallSid": probe_call_sid(),
        "CallStatus": "ringing",
        "Called": number,
        "Caller": PROBE_FROM,
        "Direction": "inbound",
        "From": PROBE_FROM,
        "To": number,
    }
    signature = RequestValidator(settings.twilio_auth_token).compute_signature(url, params)
    timeout = aiohttp.ClientTimeout(total=limits.connect)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.post(url, data=params, headers={"X-Twilio-Signature": signature}) as response,
        ):
            status, body = response.status, await response.text()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        reason = type(exc).__name__ + (f": {exc}" if str(exc) else "")
        fix = (
            "cannot reach PUBLIC_URL from here; check from outside (Twilio's console shows "
            "webhook errors under Monitor → Logs → Errors)"
        )
        return warned(check, f"POST {url}: {reason}", fix)
    if status == 403:
        fix = (
            "the server refused our signature: its TWILIO_AUTH_TOKEN differs from this machine's, "
            "or its PUBLIC_URL is not exactly this URL (scheme, host, port); set both the same"
        )
        return failed(check, f"POST {url}: HTTP 403 (signature refused)", fix)
    if status == 503:
        fix = "the server is draining (shutting down): run doctor again when it is back"
        return warned(check, f"POST {url}: HTTP 503", fix)
    if status != 200:
        fix = f"is phoneagent serving at {settings.public_url}? (a proxy may route it elsewhere)"
        return failed(check, f"POST {url}: HTTP {status}", fix)
    try:
        stream = ET.fromstring(body).find("./Connect/Stream")
    except ET.ParseError:
        stream = None
        fix = f"is phoneagent serving at {settings.public_url}? The answer was not TwiML"
        return failed(check, f"POST {url}: not TwiML", fix)
    if stream is None:
        fix = (
            f"the server answered {number} without connecting the agent: it serves other "
            "persona files, or is at its call limit (PHONEAGENT_MAX_CALLS)"
        )
        return failed(check, f"POST {url}: TwiML without <Connect><Stream>", fix)
    return passed(check, f"signed POST {url} answered TwiML streaming to {stream.get('url')}")


# --- running and printing ----------------------------------------------------------------------


async def run_checks(
    settings: Settings,
    personas: list[Persona],
    *,
    limits: Limits | None = None,
    speed: float | None = 1.0,
) -> AsyncIterator[Result]:
    """Every check that the configuration allows, StepFun first, then Twilio, in a fixed order.
    ``personas`` are the ones to check (all, or the one ``--persona`` names)."""
    limits = limits or Limits()
    if settings.stepfun_api_key:
        probe = session_config(personas[0]) if personas else _neutral_session()
        try:
            results, connector = await check_stepfun_access(settings, probe, limits)
        except Exception as exc:  # a surprise must not hide the other checks' answers
            results, connector = [_unexpected("stepfun connect", exc)], None
        for result in results:
            yield result
        if connector is not None:
            try:
                for persona in personas:
                    try:
                        results = await check_persona_model(connector, persona, limits, speed)
                    except Exception as exc:
                        results = [_unexpected(f"stepfun session [{persona.id}]", exc)]
                    for result in results:
                        yield result
            finally:
                await connector.close()
    if settings.public_url:
        yield check_public_url(settings.public_url)
    if not (settings.twilio_account_sid and settings.twilio_auth_token):
        return
    client = twilio_client(settings)
    try:
        account = await check_twilio_account(client, settings, limits)
        yield account
        if account.status != FAIL:
            for persona in personas:
                for number in persona.numbers:
                    yield await check_number(client, number, persona, settings, limits)
    finally:
        await client.http_client.close()
    number = next((n for p in personas for n in p.numbers), None)
    if settings.public_url and number:
        yield await check_voice_webhook(settings, number, limits)


def _unexpected(check: str, exc: Exception) -> Result:
    fix = "run doctor again; if it persists, report it to the phoneagent project with this line"
    return failed(check, f"doctor could not finish: {type(exc).__name__}: {exc}", fix)


def _neutral_session() -> SessionConfig:
    """A plain session for the key check when no persona loaded (their FAILs say why)."""
    return SessionConfig(
        instructions="You are a helpful assistant on a phone call.",
        voice="linjiajiejie",  # the voice of StepFun's own samples (reference section 5)
        silence_duration_ms=700,
        prefix_padding_ms=300,
        vad_threshold=1000,
    )


def redact(result: Result, secret_values: Iterable[str]) -> Result:
    """Defence in depth: no message from a library may carry a secret to the output."""
    fields = asdict(result)
    for value in secret_values:
        if value:
            fields = {k: v.replace(value, "[redacted]") for k, v in fields.items()}
    return replace(result, **fields)


def format_line(result: Result) -> str:
    line = f"{result.status} {result.check}: {result.detail}"
    return f"{line} — {result.fix}" if result.fix else line


def format_json(results: Iterable[Result]) -> str:
    return json.dumps([asdict(r) for r in results], ensure_ascii=False, indent=2)


def exit_status(results: Iterable[Result]) -> int:
    return 1 if any(r.status == FAIL for r in results) else 0
