"""How a placed call that a person answered is reported when the agent never talked in it.

The agent's TwiML gives Twilio one stream token for the call, and whoever claims it first is
the only one to report the call's end: a stream that runs reports it as any call; Twilio's
``completed`` callback that claims it first (the person hung up before the stream started)
reports ``caller_hung_up``; a stream that claims it and is then refused (the model unavailable,
the persona removed, a set-up error: the person hears the apology) reports ``agent_unavailable``
here, at once, whichever order Twilio's callback comes in. Every report goes through
:func:`report_end`, once per call across the instances sharing the replay guard.
"""

from __future__ import annotations

import time

from phoneagent.call.context import OUTBOUND, CallContext
from phoneagent.logs import get_logger
from phoneagent.records import StreamEnded
from phoneagent.state import ServerState
from phoneagent.twilio.wire.twiml import PERSONA_PARAMETER, TOKEN_PARAMETER, stream_parameter

log = get_logger(__name__)

#: A person answered a placed call and its stream claimed the token, but the agent could not
#: take the call (model unavailable, persona removed, a set-up error): they heard the apology.
#: Recorded so; ``call.ended`` reads "error".
AGENT_UNAVAILABLE = "agent_unavailable"


def answer_key(call_sid: str) -> str:
    """The answer to the callee's pick-up, as kept by the replay guard (every instance's)."""
    return f"outbound-answer:{call_sid}"


async def agent_stream(state: ServerState, call_sid: str) -> tuple[str, str]:
    """The stream token and persona of the agent's TwiML the callee's answer got (on any
    instance): ("", "") when the answer was not the agent's (none kept, the apology, a
    voicemail message), or the call is not one we placed."""
    kept = await state.replay.answer_for(answer_key(call_sid)) or ""
    token = stream_parameter(kept, TOKEN_PARAMETER) or ""
    return token, stream_parameter(kept, PERSONA_PARAMETER) or ""


async def report_refused_stream(state: ServerState, call_sid: str, token: str) -> None:
    """A stream that claimed ``token`` was refused: if it is the agent's stream of a call we
    placed, nobody else will report the call (Twilio's ``completed`` callback finds the token
    claimed), so it is reported here. A stream of an inbound call, or one taking a placed call
    back from a transfer nobody answered (its own token), sent no ``call.started``: nothing."""
    try:
        placed_token, persona_id = await agent_stream(state, call_sid)
        if not token or token != placed_token:
            return
        known = await state.calls.fetch(call_sid)
        context = CallContext.of_record(known)
        if known is not None and context is not None and context.direction == OUTBOUND:
            # The call's values for its event, answered maybe on another instance.
            state.calls.note(call_sid, context.answered(persona_id, known.caller, known.called))
        await report_end(state, call_sid, AGENT_UNAVAILABLE, persona_id)
    except Exception:  # the apology must still be heard: the stream's refusal goes on
        log.exception("outbound_end_not_reported", call_sid=call_sid)


async def report_end(state: ServerState, call_sid: str, reason: str, persona_id: str) -> None:
    """The placed call ended with ``reason`` and no stream reports it: recorded and sent in
    ``call.ended``, once (a replayed callback, or another instance, reports nothing more)."""
    key = f"outbound-end:{call_sid}"
    _, first = await state.replay.remember(key, reason)
    if not first:  # a replayed callback, or another instance reported it
        return
    # No stream ran: the end is recorded as a stream's would be, with no turns.
    record = state.calls.note(call_sid, StreamEnded(time.time(), reason, [], {}))
    persona = state.persona(persona_id or record.persona)
    log.info("outbound_call_ended", call_sid=call_sid, end_reason=reason)
    state.metrics.outbound_calls.labels(reason).inc()
    if persona is not None and state.publisher is not None and state.publishes(call_sid):
        state.spawn(state.publisher.call_ended(persona, record))
