"""Twilio's formats and checks, pure: no sockets, no aiohttp, no server state. The sans-I/O
core may import these; tests/test_architecture.py keeps it so."""
