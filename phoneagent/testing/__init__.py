"""The test kit: real servers and clients on loopback standing in for Twilio and StepFun.

Tests, benchmarks and ``phoneagent demo`` / ``simulate`` use the same pieces. Each stand-in is
written from the protocol references (``shared/reference/``), not from phoneagent's own code.
Import what you need from its module; the usual entry points:

- ``caller.TwilioCaller``: plays Twilio's side of one call (webhook, stream, playback buffer).
  Its parts, each usable alone: ``twilio_signing`` (request signatures), ``twilio_messages``
  (Media Streams message shapes), ``twiml_reader``, ``playback_buffer``, ``wav``, ``twilio_sids``.
- ``fake_model.FakeRealtimeServer``: a protocol-faithful fake of StepFun's realtime API.
- ``fake_twilio_api.FakeTwilioApi``: Twilio's REST Call resource (updates, hang-ups, faults).
- ``webhook_sink.WebhookSink``: a webhook receiver with scripted answers.
- ``tool_endpoint.ToolEndpoint``: a business's tool endpoint (persona tools) with scripted
  JSON answers, delays and faults, checking the signature.
- ``cookie_setter.CookieSetter``: a receiver that sets a cookie in every answer and notes
  the cookies it is sent back.
- ``stack.LocalStack``: phoneagent's server with the fakes, on 127.0.0.1.
- ``postgres_cluster.postgres_cluster``: a throwaway PostgreSQL server in a temporary directory.
"""
