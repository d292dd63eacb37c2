"""A persona's texts and its variables together: checked when the persona is loaded, filled
with a call's values when the call starts (``fill_persona``). The templates and values
themselves are ``variables``. No I/O."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

from phoneagent.personas.model import KeypadTransfer, Persona
from phoneagent.personas.variables import (
    Template,
    TemplateError,
    Variable,
    defaults_of,
    parse_template,
)

__all__ = ["fill_persona", "persona_texts", "templated"]

# --- a persona's texts ------------------------------------------------------------------------
# Every text a persona speaks or gives the model, by the field a persona file writes it in. A
# new persona text joins here (and in ``_with_texts``): it is then checked and filled like these.
_TOP_TEXTS = ("instructions", "greeting", "goodbye", "busy_message", "apology", "tone")
_TARGET_TEXTS = ("description", "announcement")
# ``[outbound]``'s texts: the greeting a callee hears and the message left on a machine.
_OUTBOUND_TEXTS = ("greeting", "voicemail_message")


def persona_texts(persona: Persona) -> Iterator[tuple[str, str]]:
    """(field, text) for each of the persona's texts, fields named as in its file."""
    for key in _TOP_TEXTS:
        yield key, getattr(persona, key)
    for name, target in persona.transfer.items():
        for key in _TARGET_TEXTS:
            yield f"transfer.{name}.{key}", getattr(target, key)
    if persona.outbound is not None:
        for key in _OUTBOUND_TEXTS:
            yield f"outbound.{key}", getattr(persona.outbound, key)


def fill_persona(persona: Persona, values: Mapping[str, str]) -> Persona:
    """``persona`` with its texts filled with ``values`` (a call's, from :func:`resolve`)."""
    if not persona.templates:
        return persona
    texts = {field: t.fill(values) for field, t in persona.templates.items()}
    return _with_texts(persona, texts)


def _with_texts(persona: Persona, texts: Mapping[str, str]) -> Persona:
    """``persona`` with the texts named by field replaced (fields as :func:`persona_texts`)."""
    top: dict[str, object] = {k: v for k, v in texts.items() if k in _TOP_TEXTS}
    outbound = {k.partition(".")[2]: v for k, v in texts.items() if k.startswith("outbound.")}
    if outbound and persona.outbound is not None:
        top["outbound"] = dataclasses.replace(persona.outbound, **outbound)
    targets = dict(persona.transfer)
    for field, text in texts.items():
        if field.startswith("transfer."):
            _, name, key = field.split(".")
            targets[name] = dataclasses.replace(targets[name], **{key: text})
    # A digit that transfers names the target with its words: the filled one.
    keypad = {
        digit: KeypadTransfer(targets[action.target.name])
        if isinstance(action, KeypadTransfer)
        else action
        for digit, action in persona.keypad.items()
    }
    return dataclasses.replace(persona, **top, transfer=targets, keypad=keypad)


def templated(
    persona: Persona, declared: Mapping[str, Variable]
) -> tuple[Persona, dict[str, Template], list[tuple[str, str]]]:
    """A persona just read from its file (texts as written), made ready: its texts filled with
    the defaults (a required variable shows as ``{name}``: such a persona only makes outbound
    calls, which give it), the templates of the texts that use variables kept for each call,
    and the problems found: (persona, templates, [(field, reason)])."""
    problems: list[tuple[str, str]] = []
    templates: dict[str, Template] = {}
    finals: dict[str, str] = {}
    defaults = defaults_of(declared)
    for field, text in persona_texts(persona):
        try:
            template = parse_template(text)
        except TemplateError as exc:
            problems.append((field, str(exc)))
            continue
        for name in dict.fromkeys(template.names):
            if name not in declared:
                reason = (
                    f"uses {{{name}}}, which [variables] does not declare "
                    "(declare it, or write a literal brace as {{ or }})"
                )
                problems.append((field, reason))
        if template.names:
            templates[field] = template
        finals[field] = template.fill(defaults)
    return _with_texts(persona, finals), templates, problems
