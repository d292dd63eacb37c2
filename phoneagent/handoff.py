"""Handing the call on: the tools the model may call, and what each request means. No I/O.

The model can ask to transfer the caller to one of the persona's targets, or to end the call;
a keypad digit can ask the same without the model. Either way the agent first says a sentence
(the target's announcement, or the persona's goodbye), and only once the caller has heard it
does the call change hands (see ``Call``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from phoneagent.personas import KeypadHangUp, KeypadTransfer, Persona, TransferTarget

# The built-in tools' names live with the personas, whose own tools must not take them.
from phoneagent.personas.model import END_CALL_TOOL, TRANSFER_TOOL

# The tools' arguments; what the model reads about them is in call/prompts.py.
TARGET_ARGUMENT = "target"
REASON_ARGUMENT = "reason"
# A reason is a few words for the business's records: a longer one is cut, so a model that
# rambles cannot fill the call events.
MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class Transfer:
    target: TransferTarget
    reason: str = ""  # why, as the model said it (how the caller sounded…), or the keypad digit


@dataclass(frozen=True)
class HangUp:
    time_limit: bool = False  # the persona's max_call_seconds ran out
    shutdown: bool = False  # the instance is stopping and cannot wait for the call to end


Handoff = Transfer | HangUp


def handoff_from_tool(persona: Persona, name: str, arguments: str) -> Handoff | str:
    """The handoff a tool call asks for, or the error to send back to the model."""
    if name == END_CALL_TOOL:
        return HangUp()
    if name != TRANSFER_TOOL:
        return f"unknown tool {name!r}"
    try:
        parsed = json.loads(arguments or "{}")
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        return "the arguments are not a JSON object"
    target_name = parsed.get(TARGET_ARGUMENT, "")
    if not isinstance(target_name, str):
        return f"target must be a string, one of: {', '.join(persona.transfer)}"
    target = persona.transfer.get(target_name)
    if target is None:
        return f"unknown target {target_name!r}; choose one of: {', '.join(persona.transfer)}"
    reason = parsed.get(REASON_ARGUMENT) or ""
    if not isinstance(reason, str):
        return "reason must be a string: why, in a few words"
    return Transfer(target, " ".join(reason.split())[:MAX_REASON_CHARS])


def handoff_from_keypad(persona: Persona, digit: str) -> Handoff | None:
    action = persona.keypad.get(digit)
    if isinstance(action, KeypadHangUp):
        return HangUp()
    if isinstance(action, KeypadTransfer):
        return Transfer(action.target, f"the caller pressed {digit}")
    return None


def sentence_for(persona: Persona, handoff: Handoff) -> str:
    return handoff.target.announcement if isinstance(handoff, Transfer) else persona.goodbye
