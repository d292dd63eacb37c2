"""Who may use the console: the operator password, session tokens, CSRF tokens, and the bound
on sign-in attempts. No I/O: the web shell (``console/web.py``) moves the cookies.

A session is a signed token, so any instance sharing the settings accepts it (several instances
behind one load balancer). The signing key is derived from the Twilio auth token (a secret every
instance holds and a browser never sees) and the console password, so changing either signs every
session out, and a stolen cookie gives no way to test password guesses offline. A token carries
when it was issued and a random id: signing out revokes that id, "sign out everywhere" every
session issued before then (``revocations.py``); a signature alone cannot be taken back.

``PHONEAGENT_CONSOLE_PASSWORD`` is the password itself, or its scrypt hash
(``scrypt$N$r$p$salt$hash``, from ``phoneagent console hash-password``) for operators who
keep no plain password in their configuration.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from phoneagent.client_address import bound_key

SESSION_SECONDS = 12 * 3600  # a working day; then sign in again
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # OWASP's minimum for scrypt; ~50 ms here
# v2: the issue time (ms) in place of v1's expiry, so "every session issued before now" can be
# told apart within a second. A v1 cookie (before sign-out revoked sessions) is signed out.
_SESSION_VERSION = "v2"


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The ``scrypt$N$r$p$salt$hash`` form of ``password``."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return "$".join(
        ["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)]
    )


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    """A signed-in session, from its cookie."""

    id: str  # the SHA-256 (hex) of the token's random part: what a revocation names
    issued_at: float  # wall-clock seconds
    token: str = field(repr=False)  # the cookie's value: a secret, never logged

    @property
    def expires_at(self) -> float:
        return self.issued_at + SESSION_SECONDS


class ConsoleKeys:
    """Checks the password and signs sessions, from the configured password (or hash) and the
    Twilio auth token."""

    def __init__(self, configured: str, server_secret: str) -> None:
        if not configured:
            raise ValueError("no console password: the console is off")
        self._configured = configured
        self._key = hmac.new(
            server_secret.encode(), b"phoneagent console\x00" + configured.encode(), "sha256"
        ).digest()

    def password_matches(self, attempt: str) -> bool:
        if self._configured.startswith("scrypt$"):
            _, n, r, p, salt, expected = self._configured.split("$")
            digest = _scrypt(attempt, _unb64(salt), int(n), int(r), int(p))
            return hmac.compare_digest(digest, _unb64(expected))
        # Digests of equal length: compare_digest then takes the same time whatever is typed.
        return hmac.compare_digest(
            hashlib.sha256(attempt.encode("utf-8", "surrogateescape")).digest(),
            hashlib.sha256(self._configured.encode()).digest(),
        )

    def new_session(self, now: float) -> str:
        """A session token valid for SESSION_SECONDS from ``now``."""
        body = f"{_SESSION_VERSION}.{int(now * 1000)}.{secrets.token_hex(16)}"
        return f"{body}.{self._sign('session', body)}"

    def session(self, token: str | None, now: float) -> Session | None:
        """The session of ``token`` if this server signed it and it has not expired (whether it
        was revoked is ``revocations.py``'s to say)."""
        # A cookie may hold anything: bytes that are not UTF-8 arrive as lone surrogates, which
        # signing the body would not encode (a 500 on every request with such a cookie).
        if not token or token.count(".") != 3 or not token.isascii():
            return None
        body, _, mac = token.rpartition(".")
        version, issued_ms, nonce = body.split(".")
        if version != _SESSION_VERSION or not issued_ms.isdigit() or len(issued_ms) > 15:
            return None
        expected = self._sign("session", body).encode()
        if not hmac.compare_digest(mac.encode(), expected):
            return None
        session = Session(
            # Only a hash is ever stored: the table of revoked sessions holds no token's part.
            id=hashlib.sha256(nonce.encode()).hexdigest(),
            issued_at=int(issued_ms) / 1000,
            token=token,
        )
        return session if now < session.expires_at else None

    def session_valid(self, token: str | None, now: float) -> bool:
        return self.session(token, now) is not None

    def csrf_token(self, session: str) -> str:
        """The token a state-changing request of ``session`` must carry (a form field or the
        ``X-CSRF-Token`` header): bound to the session, so another site cannot know it."""
        return self._sign("csrf", session)

    def csrf_valid(self, session: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(
            token.encode("utf-8", "surrogateescape"), self.csrf_token(session).encode()
        )

    def _sign(self, purpose: str, text: str) -> str:
        mac = hmac.new(self._key, f"{purpose}\x00{text}".encode(), "sha256").digest()
        return _b64(mac)


@dataclass
class AttemptLimiter:
    """Sign-in failures allowed per client (``per_client`` in ``window`` seconds) and in all
    (``overall``: guesses spread over many addresses). A client past its bound waits until its
    oldest failure leaves the window; a success clears the client's failures.

    Each call costs the same however many clients failed (a spray from an IPv6 /48 is 65 536
    clients; walking them all at every request would starve the event loop that carries call
    audio): clients are kept in the order of their last failure, so those out of the window are
    at the front, and a client's own old failures are dropped when it is asked about. At most
    ``max_clients`` are remembered: past it the one whose last failure is oldest is forgotten.
    That is safe: every failure still counts towards ``overall`` (the console's bound against
    guesses spread over many addresses, far below ``max_clients``), the one forgotten is the
    least likely to be at its bound still, and a spray wide enough to push clients out already
    has ``per_client`` guesses from each of more than ``max_clients`` addresses (the API's keys
    are random: no such number of guesses finds one)."""

    per_client: int = 5
    overall: int = 50
    window: float = 60.0
    clock: Callable[[], float] = time.monotonic
    max_clients: int = 10_000
    _failures: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)
    _all: deque[float] = field(default_factory=deque)

    def wait_seconds(self, client: str) -> float:
        """0 if ``client`` may try now; else how long until it may."""
        now = self.clock()
        self._forget(now)
        waits = [0.0]
        mine = self._failures.get(bound_key(client))
        if mine is not None:
            while mine[0] <= now - self.window:  # not empty: its last failure is in the window
                mine.popleft()
            if len(mine) >= self.per_client:
                waits.append(mine[0] + self.window - now)
        if len(self._all) >= self.overall:
            waits.append(self._all[0] + self.window - now)
        return max(waits)

    def failed(self, client: str) -> None:
        now = self.clock()
        key = bound_key(client)
        self._failures.setdefault(key, deque()).append(now)
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)
        self._all.append(now)

    def succeeded(self, client: str) -> None:
        self._failures.pop(bound_key(client), None)

    def _forget(self, now: float) -> None:
        """Drop what left the window: only from the front of each queue (amortised O(1))."""
        while self._all and self._all[0] <= now - self.window:
            self._all.popleft()
        while self._failures:
            client, times = next(iter(self._failures.items()))
            if times[-1] > now - self.window:
                break
            del self._failures[client]
