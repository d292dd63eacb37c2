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
from phoneagent.realtime.base import ToolSpec

TRANSFER_TOOL = "transfer_call"
END_CALL_TOOL = "end_call"


@dataclass(frozen=True)
class Transfer:
    target: TransferTarget


@dataclass(frozen=True)
class HangUp:
    time_limit: bool = False  # the persona's max_call_seconds ran out
    shutdown: bool = False  # the instance is stopping and cannot wait for the call to end


Handoff = Transfer | HangUp


def tools_for(persona: Persona) -> tuple[ToolSpec, ...]:
    """The tools declared to the model. English descriptions: StepFun's model was seen to call
    tools only with English instructions and descriptions (reference section 5)."""
    tools = []
    if persona.transfer:
        targets = "; ".join(f"{t.name}: {t.description}" for t in persona.transfer.values())
        tools.append(
            ToolSpec(
                name=TRANSFER_TOOL,
                description=(
                    "Transfer the caller to a person. Use it when the caller asks for a person "
                    f"or needs something only a person can do. Targets: {targets}"
                ),
                parameters={
                    "type": "object",
                    "properties": {
                        "target": {"type": "string", "enum": list(persona.transfer)},
                        "reason": {"type": "string", "description": "why, in a few words"},
                    },
                    "required": ["target"],
                },
            )
        )
    tools.append(
        ToolSpec(
            name=END_CALL_TOOL,
            description=(
                "End the call, once the caller has what they needed and said goodbye, or asks "
                "to hang up. The goodbye is said for you: do not say it yourself."
            ),
            parameters={
                "type": "object",
                "properties": {"reason": {"type": "string", "description": "why, in a few words"}},
            },
        )
    )
    return tuple(tools)


def handoff_from_tool(persona: Persona, name: str, arguments: str) -> Handoff | str:
    """The handoff a tool call asks for, or the error to send back to the model."""
    if name == END_CALL_TOOL:
        return HangUp()
    if name != TRANSFER_TOOL:
        return f"unknown tool {name!r}"
    try:
        target_name = json.loads(arguments or "{}").get("target", "")
    except (ValueError, AttributeError, RecursionError):
        return "the arguments are not a JSON object"
    if not isinstance(target_name, str):
        return f"target must be a string, one of: {', '.join(persona.transfer)}"
    target = persona.transfer.get(target_name)
    if target is None:
        return f"unknown target {target_name!r}; choose one of: {', '.join(persona.transfer)}"
    return Transfer(target)


def handoff_from_keypad(persona: Persona, digit: str) -> Handoff | None:
    action = persona.keypad.get(digit)
    if isinstance(action, KeypadHangUp):
        return HangUp()
    if isinstance(action, KeypadTransfer):
        return Transfer(action.target)
    return None


def sentence_for(persona: Persona, handoff: Handoff) -> str:
    return handoff.target.announcement if isinstance(handoff, Transfer) else persona.goodbye
