"""Twilio, in three layers: ``wire`` (pure: stream messages, TwiML, signatures, the stream
token, replay records; no I/O), ``rest`` (Twilio's REST API for a live call) and ``routes``
(the aiohttp routes Twilio calls)."""
