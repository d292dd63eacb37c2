"""A model that fails while its session is set up — silent, half-way, or sending what no
document describes — sends the caller to the apology within the set-up budget, counted in
`phoneagent_model_session_failures_total`, the stream closed cleanly (never 1006)."""

import asyncio

import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.call.prompts import session_config
from phoneagent.personas import PersonaRegistry
from phoneagent.realtime.connection import ModelConnector, ModelUnavailable, Prewarmer
from phoneagent.testing.hostile_model import HostileModel, SetupFault
from phoneagent.testing.stack import LocalStack

DENTAL = "+14155550100"
FRONT_DESK = "+14155550111"
BUDGET = 1.0  # the stack's set-up budget here (the default is a few seconds)
CONFIG = session_config(PersonaRegistry(EXAMPLE_PERSONAS).current.personas["bright-smile-dental"])


def failures(stack) -> float:
    metric = stack.state.metrics.model_failures
    return sum(
        sample.value for sample in metric.collect()[0].samples if sample.name.endswith("_total")
    )


@pytest.mark.parametrize("fault", list(SetupFault), ids=lambda f: f.value)
async def test_every_set_up_fault_reaches_the_apology(fault):
    async with (
        HostileModel(fault) as hostile,
        LocalStack(EXAMPLE_PERSONAS, use_fake_model=False) as stack,
    ):
        # The connector keeps its own (longer) time limits: the budget must bound them all.
        stack.state.prewarmer.connector = ModelConnector(
            url=hostile.url, api_key="k", model="stepaudio-2.5-realtime"
        )
        stack.state.prewarmer.setup_budget = BUDGET
        persona = stack.state.personas.current.personas["bright-smile-dental"]
        async with stack.caller(to=DENTAL, speed=0) as caller:
            await caller.dial()
            await caller.connect()
            after = await caller.wait_call_over(timeout=10 * BUDGET)
        assert after is not None and after.says == [persona.apology], caller.describe()
        assert after.dials == [FRONT_DESK]
        assert caller.close_code == 1000  # closed by the server, on purpose
        assert hostile.connections >= 1
        assert failures(stack) >= 1


@pytest.mark.parametrize("fault", list(SetupFault), ids=lambda f: f.value)
async def test_without_a_warm_session_the_budget_holds_too(fault):
    """The stream reached an instance that did not pre-warm (or the pre-warm failed): the new
    session is opened within the budget as well, even from a model deaf to our close."""
    async with HostileModel(fault) as hostile:
        connector = ModelConnector(url=hostile.url, api_key="k", model="stepaudio-2.5-realtime")
        prewarmer = Prewarmer(connector, setup_budget=BUDGET)
        async with asyncio.timeout(3 * BUDGET):  # a guard: the budget is the behaviour
            with pytest.raises(ModelUnavailable):
                await prewarmer.claim("CA" + "0" * 32, CONFIG)
        await prewarmer.close()
