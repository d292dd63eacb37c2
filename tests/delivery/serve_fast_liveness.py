"""`phoneagent serve` whose heartbeats are fractions of a second apart and go stale in two
seconds (liveness.py's constants, read when the server starts), so a test can kill an instance
and see another take it for dead without waiting minutes. Run as ``python serve_fast_liveness.py
serve …`` (``ServerProcess(entry=FAST_LIVENESS)``)."""

import sys

from phoneagent.cli import main
from phoneagent.delivery import liveness

HEARTBEAT_SECONDS = 0.25
STALE_SECONDS = 2.0

if __name__ == "__main__":
    liveness.HEARTBEAT_SECONDS = HEARTBEAT_SECONDS
    liveness.STALE_SECONDS = STALE_SECONDS
    sys.exit(main())
