"""The console, mounted: the shell (``web``), then each section's routes and its entry in the
navigation, in the navigation's order."""

from __future__ import annotations

from aiohttp import web

from phoneagent.console import calls, deliveries, lines, talk
from phoneagent.console.revocations import RevocationStore
from phoneagent.console.web import setup_console
from phoneagent.state import ServerState


def mount_console(app: web.Application, state: ServerState, revoked: RevocationStore) -> None:
    """``/console`` on ``app``, when ``PHONEAGENT_CONSOLE_PASSWORD`` is set; signed-out sessions
    kept in ``revoked``."""
    if setup_console(app, state, revoked):
        lines.add_routes(app)
        calls.add_routes(app)
        deliveries.add_routes(app)
        talk.add_routes(app)
