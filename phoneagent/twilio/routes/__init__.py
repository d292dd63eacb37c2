"""The aiohttp routes Twilio calls: the webhooks and the media-stream WebSocket."""
