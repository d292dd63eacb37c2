"""A receiver that sets a session cookie in every answer and notes the ``Cookie`` header of
each request: a client that sends one back keeps state from one call for another."""

from __future__ import annotations

from aiohttp import web

from phoneagent.testing.webhook_sink import LoopbackServer

__all__ = ["CookieSetter"]


class CookieSetter(LoopbackServer):
    """Answers any POST with ``{}`` (200) and ``Set-Cookie: session=answer-N``. Reach it by
    :meth:`named_url` (``localhost``): a client's cookie jar keeps no cookie of a bare IP."""

    def __init__(self) -> None:
        super().__init__()
        self.cookies: list[str | None] = []  # each request's Cookie header, None if none

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{path:.*}", self.answer)
        return app

    def named_url(self, path: str) -> str:
        return f"http://localhost:{self.port}{path}"

    async def answer(self, request: web.Request) -> web.Response:
        self.cookies.append(request.headers.get("Cookie"))
        response = web.json_response({})
        response.set_cookie("session", f"answer-{len(self.cookies)}", path="/")
        return response
