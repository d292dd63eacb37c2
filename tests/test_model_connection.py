"""The model connection against the fake StepFun server: handshake, configuration, pre-warm."""

import asyncio

import pytest

from phoneagent.realtime.base import AppendAudio, CreateResponse, SessionConfig
from phoneagent.realtime.connection import ModelConnector, ModelUnavailable, Prewarmer
from phoneagent.realtime.stepfun import StepFunDialect
from phoneagent.testing.fake_model import FakeRealtimeServer

CONFIG = SessionConfig("Be brief.", "linjiajiejie", 600, 300, 1000)


@pytest.fixture
async def fake():
    async with FakeRealtimeServer() as fake:
        yield fake


def connector_for(fake, **overrides):
    options = {"url": fake.url, "api_key": "test-key", "model": "step-2.5-realtime"}
    return ModelConnector(**(options | overrides))


async def test_open_configures_the_session(fake):
    session = await connector_for(fake).open(CONFIG)
    [fake_session] = fake.sessions
    assert session.session_id == fake_session.id
    assert fake_session.config["instructions"] == "Be brief."
    assert fake_session.config["turn_detection"]["type"] == "server_vad"
    await session.close()
    await fake.wait_for(lambda: fake.sessions_open == 0)


async def test_every_command_goes_out_as_a_text_frame(fake):
    """StepFun's documents send each client event as JSON text: the session update and the
    audio appends (written as bytes, sent as text frames) arrive as text."""
    session = await connector_for(fake).open(CONFIG)
    [fake_session] = fake.sessions
    await session.send(AppendAudio(bytes(960)))
    await session.send(CreateResponse())
    await fake.wait_for(lambda: len(fake_session.received) >= 3)
    kinds = [event.get("type") for event in fake_session.received]
    assert kinds == ["session.update", "input_audio_buffer.append", "response.create"]
    assert fake_session.binary_frames == 0
    await session.close()


async def test_refused_model_name_falls_back_once_to_the_other_spelling(fake):
    fake.models = frozenset({"stepaudio-2.5-realtime"})
    connector = connector_for(fake)
    session = await connector.open(CONFIG)
    assert session.model == "stepaudio-2.5-realtime"
    assert [h.status for h in fake.handshakes] == [400, 101]
    # The connector remembers the spelling that answered: the next call goes straight to it.
    await (await connector.open(CONFIG)).close()
    assert [h.status for h in fake.handshakes] == [400, 101, 101]
    await session.close()


@pytest.mark.parametrize("shape", ["full", "documented"])
async def test_model_refused_in_the_session_falls_back_to_the_other_spelling(fake, shape):
    # The upgrade is accepted, then the session answers an `error` about the model.
    fake.shape = shape
    fake.models_refused_in_session = frozenset({"stepaudio-2.5-realtime"})
    connector = connector_for(fake, model="stepaudio-2.5-realtime")
    session = await connector.open(CONFIG)
    assert session.model == "step-2.5-realtime"
    assert [h.path.split("model=")[1] for h in fake.handshakes] == [
        "stepaudio-2.5-realtime",
        "step-2.5-realtime",
    ]
    first, second = fake.sessions
    assert first.sent_events("error")[0]["error"]["code"] == "model_not_found"
    assert second.config["instructions"] == "Be brief."
    await fake.wait_for(lambda: first.close_code is not None)
    # The connector remembers the spelling that answered.
    await (await connector.open(CONFIG)).close()
    assert fake.handshakes[-1].path.endswith("model=step-2.5-realtime")
    await session.close()


async def test_model_refused_in_the_session_under_both_names_is_unavailable(fake):
    fake.models_refused_in_session = fake.models
    with pytest.raises(ModelUnavailable, match="model_not_found"):
        await connector_for(fake).open(CONFIG)
    assert len(fake.handshakes) == 2
    await fake.wait_for(lambda: fake.sessions_open == 0)


async def test_no_fallback_when_neither_name_is_accepted(fake):
    fake.models = frozenset({"some-other-model"})
    with pytest.raises(ModelUnavailable) as caught:
        await connector_for(fake).open(CONFIG)
    assert caught.value.status == 400
    assert len(fake.handshakes) == 2


@pytest.mark.parametrize("status", [402, 429, 500])
async def test_handshake_refusals_are_reported_with_their_status(fake, status):
    fake.fail_next_handshakes(1, status=status)
    with pytest.raises(ModelUnavailable) as caught:
        await connector_for(fake).open(CONFIG)
    assert caught.value.status == status
    assert len(fake.handshakes) == 1  # not a model-name problem: no retry


async def test_bad_key_is_401(fake):
    with pytest.raises(ModelUnavailable) as caught:
        await connector_for(fake, api_key="wrong").open(CONFIG)
    assert caught.value.status == 401


async def test_unreachable_model_is_reported():
    with pytest.raises(ModelUnavailable, match="cannot connect"):
        await ModelConnector("ws://127.0.0.1:9/v1/realtime", "k", "m", open_timeout=2).open(CONFIG)


class G711Dialect(StepFunDialect):
    """Asks for a format StepFun does not offer, so the session update is refused."""

    def encode(self, command):
        return super().encode(command).replace(b'"pcm16"', b'"g711_ulaw"', 1)


async def test_refused_session_update_is_reported_and_the_socket_closed(fake):
    with pytest.raises(ModelUnavailable, match="session refused"):
        await connector_for(fake, dialect=G711Dialect()).open(CONFIG)
    await fake.wait_for(lambda: fake.sessions_open == 0)


async def test_prewarmed_session_is_claimed_without_a_second_handshake(fake):
    fake.handshake_delay = 0.2
    prewarmer = Prewarmer(connector_for(fake))
    prewarmer.start("CA1", CONFIG)
    prewarmer.start("CA1", CONFIG)  # Twilio retried the webhook
    session = await prewarmer.claim("CA1", CONFIG)
    assert len(fake.handshakes) == 1
    assert prewarmer.waiting == 0
    await session.close()
    await prewarmer.close()


async def test_unclaimed_prewarm_is_closed_after_its_ttl(fake):
    prewarmer = Prewarmer(connector_for(fake), ttl=0.1)
    prewarmer.start("CA1", CONFIG)
    await fake.wait_for(lambda: fake.sessions_opened == 1 and fake.sessions_open == 0, 5)
    assert prewarmer.waiting == 0
    await prewarmer.close()


async def test_failed_prewarm_falls_back_to_a_fresh_session(fake):
    fake.fail_next_handshakes(1, status=500)
    prewarmer = Prewarmer(connector_for(fake))
    prewarmer.start("CA1", CONFIG)
    await asyncio.sleep(0)
    session = await prewarmer.claim("CA1", CONFIG)
    assert [h.status for h in fake.handshakes] == [500, 101]
    await session.close()
    await prewarmer.close()
