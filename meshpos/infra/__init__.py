"""Helpers that touch the operating system and outside systems: clocks, durable files, JSON
files, the small HTTP client/server (h11), serving ASGI apps with Hypercorn on trio (``asgi``),
per-connection resource guards, SQLite transactions.
Usable by the node side and the switch alike.

May import: `meshpos.domain` and the standard library.
"""
