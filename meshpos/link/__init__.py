"""The link between two nodes: frame codec, sans-IO link protocol, TLS set-up, trio driver.

Normative spec: protocols/link.md.
"""
