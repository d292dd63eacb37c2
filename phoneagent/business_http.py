"""Requests to a business's own systems — call events (``delivery/sender.py``), persona tools
(``business_tools.py``) and caller lookups (``lookup.py``): their HTTP session, the bounded read
of their answers, and their URLs kept out of error texts. What every such request shares is
decided here:

- ``User-Agent: phoneagent/<version> (<purpose>)``, so the business can tell them apart;
- ``HTTPS_PROXY`` / ``NO_PROXY`` are honoured (Standard Webhooks suggests an egress proxy
  against SSRF), read by :func:`proxy_for` for each request: aiohttp's ``trust_env`` would
  read them too, but also ``~/.netrc``, whose passwords would go to every business host;
- no cookies: one session serves every call, and a cookie the business set answering about one
  caller must never go back with another caller's request.

Redirects are refused by each request (``allow_redirects=False``): the signed body goes to the
configured URL only.
"""

from __future__ import annotations

import functools
import urllib.request
from urllib.parse import unquote, urlsplit

import aiohttp

from phoneagent import __version__
from phoneagent.logs import get_logger

__all__ = ["business_session", "proxy_for", "read_at_most", "without_url_secrets"]

log = get_logger(__name__)


def business_session(purpose: str, *, connections: int = 100) -> aiohttp.ClientSession:
    """A session for ``purpose`` (``webhooks``, ``tools``, ``lookup``), at most ``connections``
    open at once (aiohttp's default is 100)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        headers={"User-Agent": f"phoneagent/{__version__} ({purpose})"},
        trust_env=False,  # proxies by proxy_for; never ~/.netrc
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``, ``HTTP_PROXY``, upper or
    lower case; ``proxy.corp:3128`` taken as ``http://``, as curl takes it), None if there is
    none or ``NO_PROXY`` exempts its host: pass it as a request's ``proxy``. A proxy aiohttp
    cannot use (SOCKS, TLS to the proxy) is skipped, as aiohttp's own ``trust_env`` skips it,
    with a warning the first time."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return None  # the request itself fails, with its own error
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    if "://" not in proxy:
        proxy = f"http://{proxy}"
    scheme, _, rest = proxy.partition("://")
    if scheme.lower() != "http":
        _warn_unusable(scheme)
        return None
    return f"http://{rest}"


@functools.cache
def _warn_unusable(scheme: str) -> None:
    log.warning("proxy_unusable", scheme=scheme[:20], hint="use an http:// proxy")


async def read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The answer's body, or None if it is longer than ``limit`` bytes (then not read further:
    a hostile answer costs at most ``limit`` bytes of memory)."""
    if (response.content_length or 0) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.content.read(limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None
    return b"".join(chunks)


def without_url_secrets(text: str, url: str) -> str:
    """``text`` without ``url``'s query string and password (which can carry tokens), as
    written or decoded."""
    try:
        parts = urlsplit(url)
        secrets = [parts.query, parts.password or ""]
    except ValueError:
        return text.replace(url, "***")
    for secret in sorted({s for p in secrets for s in (p, unquote(p)) if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
