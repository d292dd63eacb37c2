"""The persona's own tools, as the call sees them: which model tool calls go to the business,
whether their arguments are fit to send, what is in flight, when the caller should hear the
filler sentence, and the answers as the model reads them. No I/O: the shell asks the business
(``AskBusinessTool``) and hands the answer back (``ToolAnswer``).

Rules, whatever the model or the business does:

- Arguments that are not a JSON object, or lack a required argument, or give one of the wrong
  JSON type, are refused to the model without asking the business.
- At most MAX_CALLS_PER_RESPONSE tool calls of one response, and MAX_CALLS_PER_CALL in a call,
  go to the business: a model that loops on a tool is told to go on without it.
- Every call ends with an answer to the model: the business's, or ``{"error": ...}``. If the
  shell never answers, the call gives up ANSWER_GRACE_MS after the tool's timeout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from phoneagent import strict_json
from phoneagent.personas import BusinessTool
from phoneagent.personas.tool_validation import fits_type, json_type_of

# Limits that hold whatever the model does.
MAX_CALLS_PER_RESPONSE = 3
MAX_CALLS_PER_CALL = 20
# Refusals (invalid arguments, over a limit) after which a refusal no longer asks the model for
# a response: each one would, and a model that keeps calling wrong would loop without end.
MAX_REFUSALS_PER_CALL = 10
# The shell's request is bounded by the tool's timeout; past it by this much, the call stops
# waiting for the shell (which should never happen) and tells the model there was no answer.
ANSWER_GRACE_MS = 5000

# Outcomes: the `outcome` label of phoneagent_tool_calls_total and of the call's record.
OK = "ok"
TIMEOUT = "timeout"  # no answer within the tool's timeout_ms
UNREACHABLE = "unreachable"  # connection refused, DNS, TLS: no HTTP answer at all
HTTP_ERROR = "http_error"  # an answer that is not 2xx
BAD_ANSWER = "bad_answer"  # not JSON, or larger than the limit
NOT_SIGNED = "not_signed"  # the signing secret is gone from the environment
INVALID_ARGUMENTS = "invalid_arguments"  # refused without asking the business
TOO_MANY = "too_many"  # over MAX_CALLS_PER_RESPONSE or MAX_CALLS_PER_CALL
OUTCOMES = (OK, TIMEOUT, UNREACHABLE, HTTP_ERROR, BAD_ANSWER, NOT_SIGNED, INVALID_ARGUMENTS,
            TOO_MANY)  # fmt: skip


@dataclass(frozen=True)
class ToolAnswer:
    """What became of one request to the business: the output the model gets (the answer's
    JSON, or ``{"error": ...}``), the outcome, and how long it took."""

    output: str
    outcome: str
    duration_ms: int
    status: int | None = None  # the HTTP status, if there was an answer


def error_output(reason: str) -> str:
    """An error as the model reads it: short, with no URL or secret in it."""
    return json.dumps({"error": reason}, ensure_ascii=False)


@dataclass
class PendingToolCall:
    call_id: str
    tool: BusinessTool
    asked_at: float  # the injected clock, seconds
    session: int  # the model session that made the call (its call_id means nothing to another)
    filler_said: bool = False


@dataclass
class BusinessToolCalls:
    """The persona's tools by name, and the calls to them in flight."""

    tools: dict[str, BusinessTool]
    pending: dict[str, PendingToolCall] = field(default_factory=dict)  # by call_id
    made: int = 0  # calls sent to the business in this call
    refused: int = 0  # tool calls refused to the model in this call, built-in tools' too
    session: int = 0  # which model session is the current one (a new one: +1)
    # Answers that came while the model session was being reopened: (call, output), for the
    # session that comes next.
    held: list[tuple[PendingToolCall, str]] = field(default_factory=list)

    @classmethod
    def of(cls, tools: tuple[BusinessTool, ...]) -> BusinessToolCalls:
        return cls({tool.name: tool for tool in tools})

    def ask(
        self, call_id: str, tool: BusinessTool, arguments: str, now: float, in_response: int
    ) -> dict[str, Any] | tuple[str, str]:
        """The arguments to send for a call (now pending), or (outcome, error) to tell the model.
        ``in_response``: calls of the same response already sent."""
        checked = self._checked(tool, arguments, in_response)
        if isinstance(checked, tuple):
            self.count_refusal()
            return checked
        self.made += 1
        self.pending[call_id] = PendingToolCall(call_id, tool, now, self.session)
        return checked

    def _checked(
        self, tool: BusinessTool, arguments: str, in_response: int
    ) -> dict[str, Any] | tuple[str, str]:
        if in_response >= MAX_CALLS_PER_RESPONSE:
            return TOO_MANY, f"at most {MAX_CALLS_PER_RESPONSE} tool calls at a time"
        if self.made >= MAX_CALLS_PER_CALL:
            return TOO_MANY, "no more tool calls in this call: help the caller without them"
        parsed = check_arguments(tool, arguments)
        if isinstance(parsed, str):
            return INVALID_ARGUMENTS, f"invalid arguments: {parsed}"
        return parsed

    def count_refusal(self) -> None:
        """A tool call of the model refused: these, or any other (a transfer to no target)."""
        self.refused += 1

    @property
    def answers_refusals(self) -> bool:
        """Whether a refusal still asks the model for a response (MAX_REFUSALS_PER_CALL)."""
        return self.refused <= MAX_REFUSALS_PER_CALL

    def take_held(self) -> list[tuple[PendingToolCall, str]]:
        held, self.held = self.held, []
        return held

    def answered(self, call_id: str) -> PendingToolCall | None:
        return self.pending.pop(call_id, None)

    def waiting_in(self, session: int) -> bool:
        return any(p.session == session for p in self.pending.values())

    def filler_due(self, now: float) -> BusinessTool | None:
        """The tool whose filler the caller should hear now: its answer is slower than its
        ``filler_after_ms``. Once one filler is said, every call then in flight counts as
        covered: the caller hears one "one moment" per wait, not one per tool."""
        due = next(
            (
                p
                for p in self.pending.values()
                if not p.filler_said and (now - p.asked_at) * 1000 >= p.tool.filler_after_ms
            ),
            None,
        )
        if due is None:
            return None
        for pending in self.pending.values():
            pending.filler_said = True
        return due.tool

    def overdue(self, now: float) -> list[PendingToolCall]:
        """Calls the shell has not answered long past their timeout: no longer awaited."""
        late = [
            p
            for p in self.pending.values()
            if (now - p.asked_at) * 1000 >= p.tool.timeout_ms + ANSWER_GRACE_MS
        ]
        for pending in late:
            del self.pending[pending.call_id]
        return late


def check_arguments(tool: BusinessTool, arguments: str) -> dict[str, Any] | str:
    """The model's arguments as a JSON object, or why they cannot be sent: not a JSON object,
    a required argument missing, or a declared argument of the wrong JSON type, or not one of
    its ``enum`` values. Deeper checks are the business's (it gets what the model wrote)."""
    try:  # strictly: NaN, 1e999 or half a character would reach the business as no JSON
        parsed = strict_json.loads(arguments or "{}")
    except ValueError:
        return "not valid JSON"
    if not isinstance(parsed, dict):
        return "not a JSON object"
    properties = tool.parameters.get("properties", {})
    missing = [name for name in tool.parameters.get("required", []) if name not in parsed]
    if missing:
        return f"missing {', '.join(missing)}"
    for name, value in parsed.items():
        schema = properties.get(name)
        if schema is None:
            continue
        kind = schema.get("type")
        if not fits_type(json_type_of(value), kind):
            return f"{name} must be of type {kind}"
        if "enum" in schema and value not in schema["enum"]:
            return f"{name} must be one of {', '.join(map(str, schema['enum']))}"
    return parsed
