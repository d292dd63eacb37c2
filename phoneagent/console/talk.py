"""Talk to this persona: a call from the operator's browser, through the real call path.

The page plays Twilio's part over a WebSocket in the Media Streams format (`connected`, `start`,
20 ms μ-law `media` frames, `mark` echoes once the audio before them has played, `stop`), so the
call runs exactly as a phone call does: the media stream's own ``open_model_call`` and
``run_call``, the same ``CallShell`` and ``Call`` (resampling, barge-in, tools, transcript).
What differs, and why:

- **Who may open it**: a console session, a WebSocket upgrade from this site (its ``Origin``)
  and the session's CSRF token in `start`'s ``customParameters``, instead of Twilio's signature
  and stream token.
- **The CallSid** is made up here (``CA`` + 32 hex digits, as Twilio's) and given to the page;
  the call's record names ``console`` as its caller and its log lines carry ``console=true``.
- **Transfers and hang-ups are shown on the page, never dialled** (``ConsoleHandoffs``: no
  Twilio REST request). After a transfer the page ends the stream with `stop`, as Twilio does
  once a call is redirected.
- **It lasts as long as the session**: once the operator's session is signed out (here or on
  another instance, see ``revocations.py``) or expires, the server ends the call as if the page
  had hung up (its record says ``twilio_disconnected``), after telling the page why
  (``console.ended`` with the reason ``signed_out``).
- **Its events go to no webhook** (``state.console_calls``): an operator trying a persona is not
  a customer calling. Otherwise it is a call like any other: recorded, shown live, and counted
  against ``PHONEAGENT_MAX_CALLS`` (a console call takes a model session like a phone call).
- **A draft persona** (the TOML an operator is editing) may stand in for the deployed one. It is
  checked with ``personas check``'s own checks (``personas.check_draft``, as if it replaced the
  persona's file) before any model session opens, and the same checks answer the editor as the
  operator types (``POST /console/talk/check``).

Besides Twilio's messages the server sends the page its own, named ``console.*``: ``call`` (the
CallSid, StreamSid and AccountSid to put in `start`), ``turn`` (a transcript turn, as it becomes
final), ``handoff`` (a transfer or hang-up, not dialled), ``refused`` (why the call could not
start, with a draft's problems) and ``ended`` (the end reason, just before the server closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from phoneagent.bridge import StreamRefused, bind_call_context, read_start, unbind_call_context
from phoneagent.call import Call
from phoneagent.console.auth import Session
from phoneagent.console.revocations import FRESH_SECONDS, SessionRevocations
from phoneagent.console.web import (
    KEYS,
    PREFIX,
    REVOCATIONS,
    action,
    add_section,
    page,
    render,
    session_of,
    signed_in,
)
from phoneagent.delivery.outbox import display_url
from phoneagent.logs import get_logger
from phoneagent.personas import Persona, TransferTarget, check_draft
from phoneagent.realtime.connection import ModelSession, ModelUnavailable
from phoneagent.records import CallRecords, Transferred
from phoneagent.state import STATE, ServerState
from phoneagent.twilio.routes.media_stream import open_model_call, run_call
from phoneagent.twilio.routes.twilio_line import AiohttpTwilioLine
from phoneagent.twilio.wire.twiml import PERSONA_PARAMETER

log = get_logger(__name__)

# A persona file is a few kilobytes; a draft beyond this is not one.
MAX_DRAFT_BYTES = 64 * 1024
# The draft travels in `start` as JSON (its quotes, backslashes and newlines escaped): room for
# that. Every other message is a Twilio-sized frame.
MAX_MESSAGE_BYTES = 3 * MAX_DRAFT_BYTES
# `start`'s customParameters from the page, besides the persona's id (PERSONA_PARAMETER).
CSRF_PARAMETER = "csrf"
DRAFT_PARAMETER = "draft"  # the draft's TOML; absent: the deployed persona
TOO_LARGE = f"the draft is larger than {MAX_DRAFT_BYTES // 1024} KiB"
CONSOLE_CALLER = "console"  # the record's caller: who placed the call
# `console.ended`'s reason when the operator's session ended the call (not one of the Call's).
SIGNED_OUT = "signed_out"
# `start` names a Twilio account; a console call has none (and the page never sees ours).
CONSOLE_ACCOUNT_SID = "AC" + "0" * 32


def add_routes(app: web.Application) -> None:
    add_section(app, "/talk", "Talk")
    app.router.add_get(f"{PREFIX}/talk", page(talk_page))
    app.router.add_get(f"{PREFIX}/talk/persona/{{persona_id}}", page(persona_file))
    app.router.add_post(f"{PREFIX}/talk/check", action(check_route))
    app.router.add_get(f"{PREFIX}/talk/stream", page(talk_stream))


async def talk_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    personas = sorted(state.personas.current.personas.values(), key=lambda p: p.name.lower())
    return render(
        request,
        "talk.html",
        personas=personas,
        selected=request.query.get("persona", ""),
        max_draft_bytes=MAX_DRAFT_BYTES,
    )


async def persona_file(request: web.Request) -> web.Response:
    """The persona's file as it is on disk now: where a draft starts from. A webhook URL's
    query string and credentials (which can carry tokens) are shown masked: no secret reaches
    a page, and a draft never sends webhooks anyway."""
    persona = request.app[STATE].persona(request.match_info["persona_id"])
    if persona is None or persona.source is None:
        return web.json_response({"error": "no such persona"}, status=404)
    try:
        text = persona.source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return web.json_response({"error": f"the file cannot be read: {exc}"}, status=404)
    if persona.webhook is not None and persona.webhook.url != display_url(persona.webhook.url):
        text = text.replace(persona.webhook.url, display_url(persona.webhook.url) + MASKED)
    return web.Response(text=text, content_type="text/plain")


#: What stands for a webhook URL's query string and credentials in a persona file shown.
MASKED = "?***masked***"


async def check_route(request: web.Request) -> web.Response:
    """The editor's live check: the draft (the body, text) as ``personas check`` sees it."""
    try:
        text = (await request.read()).decode("utf-8")
    except web.HTTPRequestEntityTooLarge:  # past the app's own bound on request bodies
        return web.json_response({"ok": False, "problems": [TOO_LARGE]})
    except UnicodeDecodeError:
        return web.json_response({"ok": False, "problems": ["the draft is not UTF-8 text"]})
    persona_id = request.query.get(PERSONA_PARAMETER, "")
    persona, problems = check_persona_draft(request.app[STATE], persona_id, text)
    answer: dict[str, Any] = {"ok": persona is not None, "problems": problems}
    if persona is not None:
        answer["persona"] = {"id": persona.id, "name": persona.name}
    return web.json_response(answer)


def check_persona_draft(
    state: ServerState, persona_id: str, text: str
) -> tuple[Persona | None, list[str]]:
    """A draft of persona ``persona_id``, checked as if it replaced that persona's file in the
    personas directory: the persona, or None and every problem as ``personas check`` prints it
    (file, field, reason)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_DRAFT_BYTES:
        return None, [TOO_LARGE]
    registry = state.personas
    environ = os.environ if registry.environ is None else registry.environ
    # A name only (the draft is not saved): the one `personas check` would print for the file.
    path = registry.directory / f"{persona_id or 'draft'}.toml"
    persona, problems = check_draft(text, path, registry.current.personas.values(), environ)
    return persona, [str(problem) for problem in problems]


# --- the call ---------------------------------------------------------------------------------


class DraftRefused(StreamRefused):
    """The draft persona has problems: no call."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("the draft persona has problems")
        self.problems = problems


class ConsoleLine(AiohttpTwilioLine):
    """The page's WebSocket as the call's Twilio line (the page speaks Twilio's messages), and
    the console's own ``console.*`` messages to the page."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        super().__init__(ws)
        self.call: Call | None = None  # once open: closing tells the page how the call ended
        self._posts: set[asyncio.Task[None]] = set()

    async def tell(self, event: str, **fields: Any) -> None:
        """A console message; lost without complaint if the page has gone."""
        with contextlib.suppress(ConnectionError):
            await self.ws.send_json({"event": f"console.{event}", **fields})

    def post(self, event: str, **fields: Any) -> None:
        """``tell`` from code that cannot wait (a turn listener), in the order posted."""
        task = asyncio.create_task(self.tell(event, **fields))
        self._posts.add(task)
        task.add_done_callback(self._posts.discard)

    async def close(self) -> None:
        await asyncio.gather(*self._posts, return_exceptions=True)
        if self.call is not None and self.call.end_reason is not None and not self.ws.closed:
            await self.tell("ended", reason=self.call.end_reason.value)
        await super().close()


@dataclass
class ConsoleHandoffs:
    """A console call's transfers and hang-ups (``bridge.Handoffs``): shown on the page, never
    dialled. The record keeps the transfer the persona asked for, as for a phone call."""

    line: ConsoleLine
    calls: CallRecords

    async def transfer(self, call: Call, target: TransferTarget, reason: str = "") -> str | None:
        transfer = {"target": target.name, "number": target.number, "reason": reason or None}
        self.calls.note(call.call_sid, Transferred(transfer))
        log.info("console_transfer_shown", target=target.name)
        await self.line.tell("handoff", action="transfer", **transfer)
        return None  # the page ends the stream with `stop`, as Twilio after a redirect

    async def hang_up(self, call: Call) -> str | None:
        log.info("console_hang_up_shown")
        await self.line.tell("handoff", action="hang_up")
        return None


async def talk_stream(request: web.Request) -> web.StreamResponse:
    """The page's call: a WebSocket in the Media Streams format (see the module's docstring)."""
    state = request.app[STATE]
    origin = request.headers.get("Origin", "")
    if not origin or urlsplit(origin).netloc != request.host:
        # Browsers always say where a WebSocket comes from; another site may not open one here
        # with the operator's cookie (cross-site WebSocket hijacking).
        log.warning("console_talk_cross_origin", origin=origin[:200], remote=request.remote)
        return web.Response(status=403, text="refused: open the console from its own page")
    session = await signed_in(request)
    if session is None:  # revoked since page() let the request in
        return web.json_response({"error": "sign in to the console"}, status=401)
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    line = ConsoleLine(ws)
    call_sid, stream_sid = "CA" + secrets.token_hex(16), "MZ" + secrets.token_hex(16)
    bind_call_context(call_sid, stream_sid, "")
    structlog.contextvars.bind_contextvars(console=True)
    try:
        await line.tell(
            "call", callSid=call_sid, streamSid=stream_sid, accountSid=CONSOLE_ACCOUNT_SID
        )
        try:
            call, model = await _open_console_call(request, state, line, call_sid, stream_sid)
        except (StreamRefused, TimeoutError) as exc:
            reason = str(exc) or "no `start` in time"
            problems = exc.problems if isinstance(exc, DraftRefused) else []
            log.warning("console_call_refused", reason=reason, problems=len(problems))
            await line.tell("refused", reason=reason, problems=problems)
            await ws.close()
            return ws
        except Exception:
            log.exception("console_call_open_failed")
            await line.tell("refused", reason="the server failed to open the call", problems=[])
            await ws.close()
            return ws
        line.call = call
        watch = asyncio.create_task(_end_when_signed_out(request.app[REVOCATIONS], session, line))
        try:
            await run_call(
                state,
                line,
                call,
                model,
                handoffs=ConsoleHandoffs(line, state.calls),
                turn_listeners=[lambda _call, turn: line.post("turn", turn=turn)],
            )
        finally:
            watch.cancel()
    finally:
        state.console_calls.discard(call_sid)
        unbind_call_context()
        structlog.contextvars.unbind_contextvars("console")
    return ws


async def _end_when_signed_out(
    revocations: SessionRevocations, session: Session, line: ConsoleLine
) -> None:
    """End the call once its session is revoked or expires: checked every FRESH_SECONDS (the
    store read at most that often), whether or not the page sends anything. Closing the socket
    ends the call as the page hanging up does: the agent's audio stops, the model session
    closes, the call is recorded."""
    while True:
        await asyncio.sleep(FRESH_SECONDS)
        await revocations.fresh()
        if revocations.revoked(session) or time.time() >= session.expires_at:
            break
    log.info("console_call_signed_out")
    await line.tell("ended", reason=SIGNED_OUT)
    await line.ws.close()


async def _open_console_call(
    request: web.Request, state: ServerState, line: ConsoleLine, call_sid: str, stream_sid: str
) -> tuple[Call, ModelSession]:
    """Read the page's `start`, check it and its persona (a draft fully, before any model
    session opens), then open the call as the media stream does."""
    start = await read_start(line)
    session = session_of(request)
    if session is None or not request.app[KEYS].csrf_valid(
        session, start.custom_parameters.get(CSRF_PARAMETER)
    ):
        raise StreamRefused("refused: reload the page and try again")
    if (start.call_sid, start.stream_sid) != (call_sid, stream_sid):
        raise StreamRefused("`start` must carry the callSid and streamSid the console gave")
    persona = _persona_of(state, start.custom_parameters)
    bind_call_context(call_sid, stream_sid, persona.id)
    if state.draining:
        raise StreamRefused("this instance is shutting down: try again in a moment")
    if state.at_capacity():
        raise StreamRefused(f"all lines are busy (PHONEAGENT_MAX_CALLS={state.settings.max_calls})")
    # From here the call counts against PHONEAGENT_MAX_CALLS (run_call registers it), and
    # publishes nothing.
    state.opening_calls.add(call_sid)
    state.console_calls.add(call_sid)
    try:
        return await open_model_call(state, start, persona, caller=CONSOLE_CALLER, called="")
    except ModelUnavailable as exc:
        state.opening_calls.discard(call_sid)
        raise StreamRefused(f"the model is unavailable: {exc}") from None
    except BaseException:
        state.opening_calls.discard(call_sid)
        raise


def _persona_of(state: ServerState, parameters: dict[str, str]) -> Persona:
    persona_id = parameters.get(PERSONA_PARAMETER, "")
    if DRAFT_PARAMETER in parameters:
        draft, problems = check_persona_draft(state, persona_id, parameters[DRAFT_PARAMETER])
        if draft is None:
            raise DraftRefused(problems)
        log.info("console_draft_persona", persona=draft.id)
        return draft
    persona = state.persona(persona_id)
    if persona is None:
        raise StreamRefused(f"no persona {persona_id!r} is configured")
    return persona
