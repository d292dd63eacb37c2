"""What one check of the failed-attempt bound costs while many clients failed within its window
(a spray from many addresses: an IPv6 /48 is 65 536 clients of a /64 each), as the HTTP API's
limiter is set (no overall bound), in one table.

    python bench/attempt_limiter.py

Each row: N clients fail once each, then the limiter is asked about a client that did not fail,
10 000 times (best of 5 rounds); µs per check. The check runs on the event loop that carries
call audio, so it must not grow with N.
"""

from __future__ import annotations

import platform
import sys
import time

from phoneagent.api.routes import FAILURE_WINDOW, FAILURES_PER_CLIENT
from phoneagent.console.auth import AttemptLimiter

CHECKS = 10_000


def per_check_us(clients: int) -> tuple[float, int]:
    limiter = AttemptLimiter(per_client=FAILURES_PER_CLIENT, overall=2**62, window=FAILURE_WINDOW)
    for n in range(clients):
        limiter.failed(f"2001:db8:{n >> 16:x}:{n & 0xFFFF:x}::1")
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(CHECKS):
            limiter.wait_seconds("198.51.100.7")
        best = min(best, time.perf_counter() - started)
    return best / CHECKS * 1e6, len(limiter._failures)


def main() -> None:
    print(f"Python {sys.version.split()[0]}, {platform.machine()}, {platform.system()}")
    print("| clients failed in the window | clients remembered | µs / check |")
    print("| ---: | ---: | ---: |")
    for clients in (0, 1_000, 10_000, 100_000):
        us, remembered = per_check_us(clients)
        print(f"| {clients:,} | {remembered:,} | {us:.2f} |")


if __name__ == "__main__":
    main()
