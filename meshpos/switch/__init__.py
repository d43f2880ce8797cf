"""The processor-side switch: receives forwarded batches, verifies, de-duplicates,
opens card data, advises the acquirer and returns signed settlement results.

Normative spec of what crosses the wire: protocols/forwarding.md.
"""
