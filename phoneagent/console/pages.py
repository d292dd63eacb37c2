"""The console's sections: each module adds its routes here, and its entry in the navigation."""

from __future__ import annotations

from aiohttp import web

from phoneagent.console import lines


def add_routes(app: web.Application) -> None:
    lines.add_routes(app)
