"""Call records: what the server knows about each call (``record``), kept in memory
(``memory``) or in the shared database (``postgres``), behind ``call_records.CallRecords``."""

from phoneagent.records.call_records import CallRecords
from phoneagent.records.record import (
    Answered,
    CallRecord,
    Change,
    StreamEnded,
    StreamStarted,
    TransferNotAnswered,
    Transferred,
    TurnFinished,
    TwilioReported,
    transfer_taken,
)

__all__ = [
    "Answered",
    "CallRecord",
    "CallRecords",
    "Change",
    "StreamEnded",
    "StreamStarted",
    "TransferNotAnswered",
    "Transferred",
    "TurnFinished",
    "TwilioReported",
    "transfer_taken",
]
