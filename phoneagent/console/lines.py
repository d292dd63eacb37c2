"""Lines: every persona with its numbers, language, voice, transfer targets, webhook and limits,
and what the last reload of the persona files refused."""

from __future__ import annotations

from aiohttp import web

from phoneagent.console.web import PREFIX, add_section, page, render
from phoneagent.state import STATE


def add_routes(app: web.Application) -> None:
    add_section(app, "/lines", "Lines")
    app.router.add_get(f"{PREFIX}/lines", page(lines_page))


async def lines_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    personas = sorted(state.personas.current.personas.values(), key=lambda p: p.name.lower())
    return render(request, "lines.html", personas=personas)
