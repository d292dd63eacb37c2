"""Twilio's REST API for a live call: the client, and the handoffs (transfer, hang-up) the
media-stream shell performs through it."""
