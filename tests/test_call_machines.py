"""Each machine of the call core: every transition of its table, and an unexpected event logged
once. Also: the core imports no I/O library and no server state."""

import ast
import enum
from pathlib import Path

import pytest
import structlog

from phoneagent.call.announcement import Announcement
from phoneagent.call.machine import Machine, Unexpected
from phoneagent.call.model_link import ModelLink
from phoneagent.call.playback import Playback
from phoneagent.call.response import SETTLES, ModelResponse
from phoneagent.call.watchers import Keypad, Nudge, Silence, TimeLimit

MACHINES = {
    "Playback": lambda u: Playback(lambda: 0.0, u),
    "ModelResponse": lambda u: ModelResponse("persona", u),
    "Announcement": lambda u: Announcement(u),
    "ModelLink": lambda u: ModelLink(0.0, u),
    "TimeLimit": lambda u: TimeLimit(900, u),
    "Silence": lambda u: Silence(10, u),
    "Nudge": lambda u: Nudge(u),
    "Keypad": lambda u: Keypad(u),
}
CLASSES = {
    "Playback": Playback,
    "ModelResponse": ModelResponse,
    "Announcement": Announcement,
    "ModelLink": ModelLink,
    "TimeLimit": TimeLimit,
    "Silence": Silence,
    "Nudge": Nudge,
    "Keypad": Keypad,
}


def transitions():
    for name, cls in CLASSES.items():
        for (state, kind), next_state in cls.TRANSITIONS.items():
            yield pytest.param(name, state, kind, next_state, id=f"{name}:{state.value}:{kind}")


@pytest.mark.parametrize(("name", "state", "kind", "next_state"), list(transitions()))
def test_every_listed_transition_is_taken(name, state, kind, next_state):
    machine: Machine = MACHINES[name](Unexpected())
    machine.state = state
    assert machine._fire(kind)
    if next_state == SETTLES:  # nothing is being cancelled in a fresh machine
        assert machine.state.value in ("idle", "cancelling")
    else:
        assert machine.state is next_state


@pytest.mark.parametrize("name", list(CLASSES))
def test_tables_map_states_to_states(name):
    cls = CLASSES[name]
    states = {type(state) for state, _ in cls.TRANSITIONS}
    assert len(states) == 1 and issubclass(states.pop(), enum.Enum)
    for next_state in cls.TRANSITIONS.values():
        assert isinstance(next_state, enum.Enum) or next_state == SETTLES


@pytest.mark.parametrize("name", list(CLASSES))
def test_an_unexpected_event_is_logged_once_and_changes_nothing(name):
    machine: Machine = MACHINES[name](Unexpected())
    before = machine.state
    with structlog.testing.capture_logs() as logs:
        assert not machine._fire("no_such_event")
        assert not machine._fire("no_such_event")
    assert machine.state is before
    assert [entry["event"] for entry in logs] == ["unexpected_event"]
    assert logs[0]["machine"] == name and logs[0]["kind"] == "no_such_event"


def test_the_call_logs_an_event_after_its_end_once(persona_call):
    from phoneagent.twilio.wire.stream import Media, Stop

    call = persona_call
    call.on_twilio(Stop("CA1"))
    with structlog.testing.capture_logs() as logs:
        assert call.on_twilio(Media(0, b"\xff" * 160)) == []
        assert call.on_twilio(Media(20, b"\xff" * 160)) == []
    assert [(e["event"], e["kind"]) for e in logs] == [("unexpected_event", "Media")]


def test_reconnect_policy_lives_in_the_core(persona_call):
    from phoneagent.call import EndCall, EndReason, ReconnectModel
    from phoneagent.call.model_link import RECONNECT_DELAYS

    call = persona_call
    asked = [call.on_model_dropped()]
    for _ in RECONNECT_DELAYS[1:]:
        asked.append(call.on_model_reconnect_failed("503"))
    assert asked == [[ReconnectModel(delay)] for delay in RECONNECT_DELAYS]
    assert call.on_model_reconnect_failed("503") == [EndCall(EndReason.MODEL_DISCONNECTED)]


def test_a_failed_renewal_is_tried_again_later(persona_call):
    from phoneagent.call import RenewModelSession
    from phoneagent.call.model_link import RENEW_RETRY_SECONDS, SESSION_RENEW_SECONDS
    from phoneagent.call.watchers import Tick

    call = persona_call
    start = call.clock()
    due = Tick(None, start + SESSION_RENEW_SECONDS)
    call._response.state = call._response.state.IDLE  # the greeting was answered
    assert call.on_tick(due) == [RenewModelSession()]
    assert call.on_tick(due) == []  # renewing
    call.clock = lambda: due.now
    call.on_model_renewal_failed("503")
    assert call.on_tick(due) == []
    later = Tick(None, start + SESSION_RENEW_SECONDS + RENEW_RETRY_SECONDS)
    assert call.on_tick(later) == [RenewModelSession()]


def test_notes_said_while_reconnecting_reach_the_new_session(persona_call):
    from phoneagent.call import ToModel
    from phoneagent.realtime.base import AddTextItem
    from phoneagent.twilio.wire.stream import Dtmf, Media

    call = persona_call
    call.on_model_dropped()
    call.on_twilio(Dtmf("5"))
    during = call.on_twilio(Media(5000, b"\xff" * 160))
    assert not any(isinstance(a, ToModel) for a in during)  # nothing reaches a dropped model
    after = call.on_model_reconnected()
    notes = [a.command for a in after if isinstance(a, ToModel)]
    assert AddTextItem("user", "(I pressed 5 on my phone's keypad.)") in notes


@pytest.fixture
def persona_call():
    from conftest import EXAMPLE_PERSONAS

    from phoneagent.call import Call
    from phoneagent.personas import load_directory

    persona = load_directory(EXAMPLE_PERSONAS, environ={}).personas["bright-smile-dental"]
    now = [1000.0]
    return Call(persona, stream_sid="MZ1", call_sid="CA1", clock=lambda: now[0])


FORBIDDEN = ("aiohttp", "websockets", "phoneagent.state", "phoneagent.server", "phoneagent.bridge")


def test_the_call_core_imports_no_io_and_no_server_state():
    core = Path(__file__).parent.parent / "phoneagent" / "call"
    for path in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"


def test_no_machine_holds_more_than_about_ten_attributes():
    from conftest import EXAMPLE_PERSONAS

    from phoneagent.call import Call
    from phoneagent.personas import load_directory

    persona = load_directory(EXAMPLE_PERSONAS, environ={}).personas["bright-smile-dental"]
    call = Call(persona, stream_sid="MZ1", call_sid="CA1")
    config = {"persona", "stream_sid", "call_sid", "clock", "history", "opening", "greeting",
              "model_input_rate", "model_output_rate"}  # fmt: skip
    objects = [call, call._playback, call._response, call._handoff, call._link, call._tools]
    objects += vars(call._watchers).values()
    for obj in objects:
        state = set(vars(obj)) - config
        # "About ten": the Call's thirteen are its five machines, the persona tools' calls, the
        # watchers, the transcript, the caller audio, the barge-in candidate, stats, the
        # unexpected-event log, its start.
        assert len(state) <= 13, (type(obj).__name__, sorted(state))


def test_every_end_reason_reads_as_a_schema_end_reason():
    from phoneagent.call import EndReason
    from phoneagent.delivery.events import END_REASONS
    from phoneagent.delivery.publisher import event_end_reason

    for reason in EndReason:
        assert event_end_reason(reason.value) in END_REASONS
    assert event_end_reason(EndReason.TWILIO_DISCONNECTED.value) == "error"
    assert event_end_reason(EndReason.MODEL_DISCONNECTED.value) == "error"
    assert event_end_reason(None) == "error"
    # A drain's goodbye and a drain's cut differ only inside (the cut gets the apology).
    assert event_end_reason(EndReason.DRAIN_GOODBYE.value) == "server_shutdown"
    assert event_end_reason(EndReason.SERVER_SHUTDOWN.value) == "server_shutdown"
