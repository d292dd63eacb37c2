"""The console's web shell: sign-in, the session cookie, CSRF checks, security headers and
page rendering. The pages themselves live in their own modules (``lines``, ``calls``,
``deliveries``, ``talk``), each adding its routes with :func:`page` / :func:`action`.

Served by phoneagent itself at ``/console`` when ``PHONEAGENT_CONSOLE_PASSWORD`` is set, on the
same port as Twilio's webhooks (the operator reaches it where Twilio does); never the Twilio
credentials, and nothing without a session but the sign-in page and the static files.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import jinja2
from aiohttp import web

from phoneagent.console.auth import SESSION_SECONDS, AttemptLimiter, ConsoleKeys, Session
from phoneagent.console.revocations import RevocationStore, SessionRevocations
from phoneagent.logs import get_logger
from phoneagent.state import ServerState

log = get_logger(__name__)

COOKIE = "phoneagent_console"
PREFIX = "/console"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

KEYS = web.AppKey("console_keys", ConsoleKeys)
LIMITER = web.AppKey("console_attempts", AttemptLimiter)
REVOCATIONS = web.AppKey("console_revocations", SessionRevocations)
TEMPLATES = web.AppKey("console_templates", jinja2.Environment)

# Pages load only their own scripts and styles; nothing frames them.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "media-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'; "
        "form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

# The sections, in the navigation's order: (path under /console, label).
SECTIONS = web.AppKey("console_sections", list[tuple[str, str]])


def setup_console(app: web.Application, state: ServerState, revoked: RevocationStore) -> bool:
    """Add the console to ``app`` if a password is configured; whether it was. ``revoked``:
    where signed-out sessions are kept (closed with the app)."""
    settings = state.settings
    if not settings.console_password:
        return False
    app[KEYS] = ConsoleKeys(settings.console_password, settings.twilio_auth_token)
    app[REVOCATIONS] = revocations = SessionRevocations(revoked)
    app[LIMITER] = AttemptLimiter()
    app[SECTIONS] = []
    app[TEMPLATES] = jinja2.Environment(
        loader=jinja2.PackageLoader("phoneagent.console", "templates"),
        autoescape=True,  # every value is escaped: caller numbers, transcripts, persona texts
        undefined=jinja2.StrictUndefined,
    )
    app.router.add_get(PREFIX, _home)
    app.router.add_get(f"{PREFIX}/", _home)
    app.router.add_get(f"{PREFIX}/login", _login_page)
    app.router.add_post(f"{PREFIX}/login", _login)
    app.router.add_post(f"{PREFIX}/logout", action(_logout))
    app.router.add_post(f"{PREFIX}/logout-everywhere", action(_logout_everywhere))
    app.router.add_static(f"{PREFIX}/static", _static_dir())
    app.middlewares.append(_security_headers)

    async def close_revocations(app: web.Application) -> None:
        await revocations.close()

    app.on_cleanup.append(close_revocations)
    log.info("console_enabled", path=PREFIX)
    return True


def add_section(app: web.Application, path: str, label: str) -> None:
    """Put the page at ``/console{path}`` in the navigation."""
    app[SECTIONS].append((path, label))


def _static_dir() -> str:
    from importlib.resources import files

    return str(files("phoneagent.console") / "static")


@web.middleware
async def _security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    if request.path.startswith(PREFIX) and not response.prepared:
        response.headers.update(SECURITY_HEADERS)
    return response


# --- sessions -----------------------------------------------------------------------------


def session_of(request: web.Request) -> str | None:
    """The request's session token, if it is valid now and not known to be revoked (from
    memory: a guarded route has just made sure that is fresh, see ``signed_in``)."""
    session = _session(request)
    return session.token if session is not None else None


def _session(request: web.Request) -> Session | None:
    session = request.app[KEYS].session(request.cookies.get(COOKIE), time.time())
    if session is None:
        return None
    revocations = request.app[REVOCATIONS]
    revocations.refresh_soon()  # a long-lived check (an event stream's) sees other instances'
    return None if revocations.revoked(session) else session


async def signed_in(request: web.Request) -> Session | None:
    """The request's session if it is valid and not revoked, on any instance (what the store
    said at most FRESH_SECONDS ago: see ``revocations.py``)."""
    if request.app[KEYS].session(request.cookies.get(COOKIE), time.time()) is None:
        return None  # no store read for a request without a session
    await request.app[REVOCATIONS].fresh()
    return _session(request)


def page(handler: Handler) -> Handler:
    """A page or data route that needs a session: a browser asking for a page without one is
    sent to sign in; anything else (an event stream, JSON, a WebSocket) gets 401."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        if await signed_in(request) is None:
            return _not_signed_in(request)
        return await handler(request)

    return guarded


def action(handler: Handler) -> Handler:
    """A state-changing request: it needs a session, the session's CSRF token (form field
    ``csrf`` or header ``X-CSRF-Token``), and, when the browser says where it comes from, this
    origin. Refused with 401 or 403 otherwise."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        signed = await signed_in(request)
        if signed is None:
            return _not_signed_in(request)
        session = signed.token
        token = request.headers.get("X-CSRF-Token")
        if token is None and request.content_type in (
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ):
            token = str((await request.post()).get("csrf", ""))
        if not _same_origin(request) or not request.app[KEYS].csrf_valid(session, token):
            log.warning("console_csrf_refused", path=request.path, remote=request.remote)
            return web.Response(status=403, text="refused: reload the page and try again")
        return await handler(request)

    return guarded


def _not_signed_in(request: web.Request) -> web.StreamResponse:
    wants_page = request.method == "GET" and "text/html" in request.headers.get("Accept", "")
    if wants_page:
        raise web.HTTPSeeOther(f"{PREFIX}/login?next={request.rel_url.path}")
    return web.json_response({"error": "sign in to the console"}, status=401)


def _same_origin(request: web.Request) -> bool:
    """False when the browser names another origin (Origin, else Referer) than this host."""
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if not origin or origin == "null":
        return origin is None  # "null": a sandboxed or privacy-stripped origin, not ours
    return urlsplit(origin).netloc == request.host


def render(
    request: web.Request, template: str, *, status: int = 200, **context: Any
) -> web.Response:
    """``template`` with ``context``, the navigation and the session's CSRF token."""
    session = session_of(request)
    text = (
        request.app[TEMPLATES]
        .get_template(template)
        .render(
            sections=request.app[SECTIONS],
            path=request.path,
            csrf=request.app[KEYS].csrf_token(session) if session else "",
            signed_in=session is not None,
            static=lambda name: f"{PREFIX}/static/{name}",
            **context,
        )
    )
    return web.Response(text=text, content_type="text/html", status=status)


# --- sign-in ------------------------------------------------------------------------------


async def _home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther(f"{PREFIX}/lines")


def _next_page(request: web.Request, raw: str | None) -> str:
    """Where to go after signing in: a console path only (never another site)."""
    target = raw or ""
    if not target.startswith(f"{PREFIX}/") or target.startswith("//") or "\\" in target:
        return f"{PREFIX}/lines"
    return target


async def _login_page(request: web.Request) -> web.StreamResponse:
    if await signed_in(request) is not None:
        raise web.HTTPSeeOther(_next_page(request, request.query.get("next")))
    return render(request, "login.html", next=_next_page(request, request.query.get("next")),
                  error=None)  # fmt: skip


async def _login(request: web.Request) -> web.StreamResponse:
    limiter, client = request.app[LIMITER], request.remote or "?"
    form = await request.post()
    target = _next_page(request, str(form.get("next", "")))
    if not _same_origin(request):
        return web.Response(status=403, text="refused: sign in from the console's own page")
    wait = limiter.wait_seconds(client)
    if wait > 0:
        log.warning("console_sign_in_limited", remote=client)
        response = render(request, "login.html", next=target, status=429,
                          error=f"Too many attempts. Try again in {int(wait) + 1} s.")  # fmt: skip
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    if not request.app[KEYS].password_matches(str(form.get("password", ""))):
        limiter.failed(client)
        log.warning("console_sign_in_failed", remote=client)
        return render(request, "login.html", next=target, status=401,
                      error="Wrong password.")  # fmt: skip
    limiter.succeeded(client)
    log.info("console_signed_in", remote=client)
    response = web.HTTPSeeOther(target)
    response.set_cookie(
        COOKIE,
        request.app[KEYS].new_session(time.time()),
        max_age=SESSION_SECONDS,
        path=PREFIX,
        httponly=True,
        secure=not _is_loopback(request.host),
        samesite="Strict",
    )
    raise response


async def _logout(request: web.Request) -> web.StreamResponse:
    """Revoke this session (on every instance), then forget its cookie."""
    # Signature and expiry only: a second click of Sign out finds it revoked already, and
    # revoking it again changes nothing.
    session = request.app[KEYS].session(request.cookies.get(COOKIE), time.time())
    if session is not None:
        stored = await request.app[REVOCATIONS].revoke(session)
        log.info("console_signed_out", remote=request.remote, everywhere=False, stored=stored)
    raise _signed_out()


async def _logout_everywhere(request: web.Request) -> web.StreamResponse:
    """Revoke every session issued until now, this one too, on every instance."""
    stored = await request.app[REVOCATIONS].revoke_all_before(time.time())
    log.info("console_signed_out", remote=request.remote, everywhere=True, stored=stored)
    raise _signed_out()


def _signed_out() -> web.HTTPSeeOther:
    """To the sign-in page, the browser's cookie deleted."""
    response = web.HTTPSeeOther(f"{PREFIX}/login")
    response.del_cookie(COOKIE, path=PREFIX)
    return response


def _is_loopback(host: str) -> bool:
    """The browser is on this machine (http://localhost is fine without Secure)."""
    name = host.rsplit(":", 1)[0].strip("[]") if not host.endswith("]") else host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
