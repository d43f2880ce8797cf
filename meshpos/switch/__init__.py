"""The processor-side switch: receives forwarded batches, verifies, de-duplicates,
opens card data, advises the acquirer and returns signed settlement results.

Modules: processor (the rules per batch and per sale), store (its SQLite table), api (the
forwarding API's bodies), service (HTTPS serving, the acquirer link from the config),
connlimit (connection bounds), hardening (no core dumps), switchdir / cli / tls / const.

Normative spec of what crosses the wire: protocols/forwarding.md.
"""
