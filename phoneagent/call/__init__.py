"""The sans-I/O core of one phone call: ``Call`` and the small machines it composes.

Imported by the shells as ``from phoneagent.call import Call, SendMedia, ...``; the modules:
``call`` (the composition and what every event means), ``playback``, ``response``,
``announcement`` (the handoff), ``tool_calls`` (the persona's own tools), ``watchers`` (driven
by ``Tick``), ``model_link`` (renewal and reconnection), ``actions``, ``transcript``,
``prompts`` (every sentence the model is told) and ``machine`` (the transition-table helper).
No module here does I/O.
"""

from phoneagent.call.actions import (
    Action,
    AskBusinessTool,
    EndCall,
    EndReason,
    HangUpCall,
    ReconnectModel,
    RenewModelSession,
    SendClear,
    SendMark,
    SendMedia,
    ToModel,
    ToolCallFinished,
    TransferCall,
    TurnFinished,
)
from phoneagent.call.call import STOP_MEANS, Call, CallState
from phoneagent.call.playback import FRAMES_PER_MESSAGE, MARK_EVERY_MS
from phoneagent.call.tool_calls import ToolAnswer
from phoneagent.call.watchers import Tick

__all__ = [
    "FRAMES_PER_MESSAGE",
    "MARK_EVERY_MS",
    "STOP_MEANS",
    "Action",
    "AskBusinessTool",
    "Call",
    "CallState",
    "EndCall",
    "EndReason",
    "HangUpCall",
    "ReconnectModel",
    "RenewModelSession",
    "SendClear",
    "SendMark",
    "SendMedia",
    "Tick",
    "ToModel",
    "ToolAnswer",
    "ToolCallFinished",
    "TransferCall",
    "TurnFinished",
]
