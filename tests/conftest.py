"""Shared fixtures: a complete valid environment and the project's own paths."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PERSONAS = PROJECT_ROOT / "personas"
BROKEN_PERSONAS = PROJECT_ROOT / "tests" / "fixtures" / "personas_broken"

VALID_ENV = {
    "PUBLIC_URL": "https://voice.example.com",
    "TWILIO_ACCOUNT_SID": "AC" + "0123456789abcdef" * 2,
    "TWILIO_AUTH_TOKEN": "twilio-auth-token-value",
    "STEPFUN_API_KEY": "stepfun-api-key-value",
}


@pytest.fixture
def valid_env() -> dict[str, str]:
    return dict(VALID_ENV)
