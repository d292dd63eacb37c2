"""Prometheus metrics, served at ``GET /metrics`` on the metrics listener (not on the port
Twilio reaches; see ``server.serve_metrics``).

One registry per application (not the library's global one), so several apps in one process —
tests, benchmarks — each count their own calls.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# Per-message work is tens of microseconds; a slow one is a millisecond or more.
FRAME_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2)
REACTION_BUCKETS = (2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
FIRST_AUDIO_BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
# A tool answer past the filler (1.5 s by default) is one the caller waits for; 15 s: the most
# a tool's timeout_ms allows.
TOOL_CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 15.0)


class Metrics:
    def __init__(
        self, active_calls: Callable[[], int], unauthenticated: Callable[[], int] = lambda: 0
    ):
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_calls = Gauge(
            "phoneagent_active_calls", "Calls with a media stream open now.", registry=r
        )
        self.active_calls.set_function(active_calls)
        self.calls = Counter(
            "phoneagent_calls", "Calls ended, by end reason.", ["end_reason"], registry=r
        )
        self.first_audio = Histogram(
            "phoneagent_first_agent_audio_seconds",
            "From the stream's start to the first agent audio frame sent to Twilio.",
            buckets=FIRST_AUDIO_BUCKETS,
            registry=r,
        )
        self.barge_ins = Counter(
            "phoneagent_barge_ins", "Times a caller interrupted the agent.", registry=r
        )
        self.barge_in_reaction = Histogram(
            "phoneagent_barge_in_reaction_seconds",
            "From the event that decided a barge-in to Twilio's `clear` written.",
            buckets=REACTION_BUCKETS,
            registry=r,
        )
        self.model_reconnects = Counter(
            "phoneagent_model_reconnects", "Model sessions reopened mid-call.", registry=r
        )
        self.model_failures = Counter(
            "phoneagent_model_session_failures",
            "Model sessions that could not be opened, by HTTP status of the refusal (or none).",
            ["status"],
            registry=r,
        )
        self.streams_refused = Counter(
            "phoneagent_streams_refused",
            "Media streams refused before any model cost: no `start`, a bad, expired or reused "
            "token, a second stream for a call, a persona no longer configured.",
            registry=r,
        )
        self.lookup_failures = Counter(
            "phoneagent_lookup_failures",
            "Inbound calls whose persona lookup gave nothing usable in time, by reason "
            "(timeout, unreachable, status, too_large, not_json, unsigned): answered with the "
            "persona's defaults.",
            ["reason"],
            registry=r,
        )
        self.webhook_replays = Counter(
            "phoneagent_twilio_webhook_replays",
            "Voice or <Dial> action webhooks seen again for the same call: answered as before, "
            "nothing started.",
            registry=r,
        )
        self.calls_apologised = Counter(
            "phoneagent_calls_apologised",
            "Streams that ended with the caller still on the line and the agent unable to go on: "
            "Twilio was answered with the persona's apology and fallback.",
            registry=r,
        )
        self.tool_calls = Counter(
            "phoneagent_tool_calls",
            "Persona tool calls, by outcome: ok, timeout, unreachable, http_error, bad_answer, "
            "not_signed (answered with an error, no request), invalid_arguments and too_many "
            "(refused to the model without asking the business).",
            ["outcome"],
            registry=r,
        )
        self.tool_call_duration = Histogram(
            "phoneagent_tool_call_seconds",
            "From a persona tool call's request to the business's answer (or its failure).",
            buckets=TOOL_CALL_BUCKETS,
            registry=r,
        )
        self.transfers = Counter(
            "phoneagent_transfers", "Transfers asked of Twilio, by outcome.", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.outbound_calls = Counter(
            "phoneagent_outbound_calls",
            "Outbound calls asked for: `placed`, or the refusal's code (`outside_calling_hours`, "
            "`too_many_calls`, `twilio_refused`, ...); and how those nobody talked in ended.",
            ["outcome"],
            registry=r,
        )
        self.unauthenticated = Gauge(
            "phoneagent_unauthenticated_requests",
            "Twilio requests waiting on their client before authentication now: a webhook "
            "while its body arrives, a media stream until its `start` and token check out.",
            registry=r,
        )
        self.unauthenticated.set_function(unauthenticated)
        self.http_refused = Counter(
            "phoneagent_http_refused",
            "Requests refused before authentication, by reason: `unauthenticated_limit` (503, "
            "PHONEAGENT_MAX_UNAUTHENTICATED reached), `body_timeout` (408, body too slow), "
            "`api_key` (401, no valid API key), `api_key_limit` (429, too many failed API keys).",
            ["reason"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "phoneagent_webhook_deliveries",
            "Webhook delivery attempts, by outcome (delivered, retry, failed).",
            ["outcome"],
            registry=r,
        )
        self.outbox_ok = Gauge(
            "phoneagent_outbox_ok",
            "1 while the webhook outbox takes and serves events, 0 while it fails (damaged, "
            "disk full, read-only): the instance is then unready.",
            registry=r,
        )
        self.outbox_errors = Counter(
            "phoneagent_outbox_errors",
            "Rounds of the delivery loop that failed on the outbox (reads, claims, updates).",
            registry=r,
        )
        self.outbox_write_failures = Counter(
            "phoneagent_outbox_write_failures",
            "Event commits the outbox refused (each event is then held in memory and retried).",
            registry=r,
        )
        self.events_spooled = Gauge(
            "phoneagent_webhook_events_spooled",
            "Webhook events held in memory because the outbox refuses writes.",
            registry=r,
        )
        self.events_lost = Counter(
            "phoneagent_webhook_events_lost",
            "Webhook events that could not be kept, by reason: spool_full (the in-memory bound "
            "was reached), shutdown (still held when the server stopped), refused (a value the "
            "shared database cannot store, for good).",
            ["reason"],
            registry=r,
        )
        self.call_records_pending = Gauge(
            "phoneagent_call_records_pending",
            "Call-record changes waiting to be written to the shared database (retried while it "
            "refuses them; the instance is unready meanwhile).",
            registry=r,
        )
        self.call_records_unshared = Counter(
            "phoneagent_call_records_unshared",
            "Call-record changes never written to the shared database (too many pending, "
            "refused by the database for good, or still pending when the server stopped): "
            "other instances do not see them.",
            registry=r,
        )
        self.lost_calls_closed = Counter(
            "phoneagent_lost_calls_closed",
            "Calls an instance lost (killed mid-call) that this one ended with a call.ended of "
            "end reason server_lost: at start-up, those of its previous run (SQLite); on a "
            "shared database, those of any instance whose heartbeat went stale.",
            registry=r,
        )
        self.heartbeat_age = Gauge(
            "phoneagent_instance_heartbeat_age_seconds",
            "Seconds since this instance last recorded its heartbeat in the shared database "
            "(PostgreSQL only; 0 otherwise). Past 60 the other instances take it for dead and "
            "end its calls as server_lost: alert well before.",
            registry=r,
        )
        self.media_seconds = Histogram(
            "phoneagent_media_processing_seconds",
            "Server work per media message (transcode, JSON, socket write), by direction: a "
            "caller's 20 ms frame (one in ten, sampled), or an agent message of up to 200 ms.",
            ["direction"],
            buckets=FRAME_BUCKETS,
            registry=r,
        )
        self.inbound_media = self.media_seconds.labels("caller_to_model")
        self.outbound_media = self.media_seconds.labels("model_to_caller")

    def record_tool_call(self, outcome: str, duration_ms: int | None) -> None:
        """One persona tool call; ``duration_ms`` None: refused, no request was made."""
        self.tool_calls.labels(outcome).inc()
        if duration_ms is not None:
            self.tool_call_duration.observe(duration_ms / 1000)

    def record_call_end(self, end_reason: str, stats: dict) -> None:
        self.calls.labels(end_reason).inc()
        if stats.get("first_agent_audio_ms") is not None:
            self.first_audio.observe(stats["first_agent_audio_ms"] / 1000)
        self.barge_ins.inc(stats.get("barge_ins", 0))
        for reaction_ms in stats.get("barge_in_reaction_ms", []):
            self.barge_in_reaction.observe(reaction_ms / 1000)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
