"""The HTTP API under ``/api/v1``: what a business's own software calls (place a call, read
calls and lines), authenticated with API keys.

- ``keys``: an API key's text, its hash and what it may do. No I/O.
- ``key_store``: where keys are kept (the SQLite data directory, or the shared PostgreSQL
  database), read at every request so a revocation holds at once on every instance.
- ``errors``: the one error shape every API answer uses, and ``ApiError`` (which an outbound
  dialer raises to refuse a call).
- ``validation``: the checks of what a client sends. No I/O.
- ``routes``: the routes, their authentication and the limit on failed attempts;
  ``mount_api``, and the app's ``OUTBOUND`` holder, where the server puts its outbound
  dialer (``outbound.dialer.ApiDialer``).
- ``cli``: ``phoneagent keys create|list|revoke``.
- ``openapi.json``: the API's description, served at ``/api/v1/openapi.json``.

Nothing is imported here: ``phoneagent keys`` stays quick without the server's modules.
"""
