"""Helpers that touch the operating system: clocks, durable files, child processes, the small HTTP client/server, per-connection resource guards.

May import: `meshpos.domain` and the standard library.
"""
