"""Round trips to the shared database on a call's path, within a budget.

A database host that vanished (or a network cut) answers nothing, not an error: without a
budget a webhook would wait for the pool's connect and command timeouts, and Twilio gives up on
a webhook after 15 s. A round trip here gets ``ROUND_TRIP_SECONDS``; after one fails, or while
the outbox reports the database silent, none is tried for ``AWAY_SECONDS`` (the caller uses what
it has in memory meanwhile), then the database is asked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import asyncpg

from phoneagent.delivery.outbox import OutboxError, OutboxRefused
from phoneagent.delivery.pg_outbox import PostgresOutbox

__all__ = ["AWAY_SECONDS", "ROUND_TRIP_SECONDS", "RoundTrips"]

#: One round trip's budget: a healthy database answers in milliseconds.
ROUND_TRIP_SECONDS = 2.0
#: After a failed round trip, no other for this long before the database is asked again.
AWAY_SECONDS = 5.0


class RoundTrips:
    """Connections of ``outbox``'s pool for one budgeted round trip each."""

    def __init__(self, outbox: PostgresOutbox) -> None:
        self.outbox = outbox
        self._away_until = 0.0  # monotonic: until then, the database is not asked
        self._away = ""  # why

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for one round trip within its budget; OutboxError at once while the
        database is known to be away, or when the round trip fails or runs out of time."""
        problem = self.outbox.problem
        if problem is None and time.monotonic() < self._away_until:
            problem = self._away
        if problem is not None:
            raise OutboxError(problem)
        try:
            async with (
                asyncio.timeout(ROUND_TRIP_SECONDS) as budget,
                self.outbox.connection() as conn,
            ):
                try:
                    yield conn
                except asyncio.CancelledError:
                    if budget.expired():
                        # Closed at once: handing back a connection with a query in flight
                        # would wait for the database to answer its cancellation.
                        conn.terminate()
                    raise
        except TimeoutError:
            self._went_away(
                f"the database {self.outbox.url} did not answer in {ROUND_TRIP_SECONDS} s"
            )
            raise OutboxError(self._away) from None
        except OutboxRefused:
            raise  # the database answered: it is not away, this request was wrong
        except OutboxError as exc:
            self._went_away(str(exc))
            raise

    def _went_away(self, why: str) -> None:
        self._away, self._away_until = why, time.monotonic() + AWAY_SECONDS
