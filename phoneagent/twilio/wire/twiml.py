"""The TwiML we answer Twilio with, and the ``<Parameter>``s our stream TwiML carries (they
come back in the stream's `start`)."""

from __future__ import annotations

from collections.abc import Mapping
from xml.etree import ElementTree

from twilio.twiml.voice_response import VoiceResponse

from phoneagent.personas import Persona
from phoneagent.twilio.wire.say_voices import say_voices

PERSONA_PARAMETER = "persona"
TOKEN_PARAMETER = "token"
CALLER_PARAMETER = "from"
CALLED_PARAMETER = "to"
RESUME_PARAMETER = "resume"  # "<target>:<DialCallStatus>": back from an unanswered transfer


def connect_stream_twiml(
    stream_url: str, status_callback_url: str, parameters: Mapping[str, str], action_url: str
) -> str:
    """``<Connect action><Stream>``: a bidirectional media stream. When we close the stream
    while the caller is still on the line, Twilio asks ``action`` what to do next (the call
    would end there otherwise): the apology and the fallback are answered from there, so they
    never race the stream's end (twilio reference, sections 1.3 and 7)."""
    response = VoiceResponse()
    connect = response.connect(action=action_url)
    stream = connect.stream(url=stream_url, status_callback=status_callback_url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    return str(response)


def stream_parameter(twiml: str, name: str) -> str | None:
    """The value of the ``<Parameter name>`` in a stream TwiML of ours
    (:func:`connect_stream_twiml`), or None: not a stream's TwiML, or no such parameter."""
    try:
        root = ElementTree.fromstring(twiml)
    except ElementTree.ParseError:
        return None
    for parameter in root.iterfind("./Connect/Stream/Parameter"):
        if parameter.get("name") == name:
            return parameter.get("value")
    return None


def say_then_hand_on_twiml(message: str, persona: Persona, called: str) -> str:
    """Twilio says ``message`` in the persona's language, with a voice that speaks it (both
    checked when the persona was loaded: a voice that does not speak the language fails the
    ``<Say>``), then dials the persona's fallback target if it has one, else hangs up: a caller
    never sits in silence."""
    response = VoiceResponse()
    response.say(message, language=persona.say_language, voice=persona.say_voice)
    target = persona.transfer.get(persona.fallback_target)
    if target is not None:
        response.dial(target.number, caller_id=target.caller_id or called or None,
                      timeout=target.ring_seconds)  # fmt: skip
    response.hangup()
    return str(response)


def busy_twiml(persona: Persona, called: str) -> str:
    return say_then_hand_on_twiml(persona.busy_message, persona, called)


def say_then_hang_up_twiml(message: str, persona: Persona) -> str:
    """``message`` said by Twilio in the persona's language and ``<Say>`` voice, then a hang-up
    (an outbound call's voicemail message: nobody is there to be handed on)."""
    response = VoiceResponse()
    response.say(message, language=persona.say_language, voice=persona.say_voice)
    response.hangup()
    return str(response)


def redirect_twiml(url: str) -> str:
    response = VoiceResponse()
    response.redirect(url, method="POST")
    return str(response)


def hangup_twiml() -> str:
    response = VoiceResponse()
    response.hangup()
    return str(response)


# A number no persona answers has no language of its own: its apology is English.
NO_PERSONA_LANGUAGE = "en-US"


def apology_twiml(message: str) -> str:
    response = VoiceResponse()
    voice = say_voices().defaults[NO_PERSONA_LANGUAGE]
    response.say(message, language=NO_PERSONA_LANGUAGE, voice=voice)
    response.hangup()
    return str(response)


def dial_twiml(number: str, *, caller_id: str, ring_seconds: int, action_url: str) -> str:
    """``<Dial>`` to a person. ``action`` (absolute, as inline TwiML requires: error 15004) is
    requested when the dialled leg ends, so an unanswered transfer can come back to the agent."""
    response = VoiceResponse()
    response.dial(number, caller_id=caller_id or None, timeout=ring_seconds, action=action_url)
    return str(response)
