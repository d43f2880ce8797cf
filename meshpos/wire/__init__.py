"""Every byte format and protocol state machine of meshpos, pure: bytes and values in, bytes,
values and events out. Nothing here does I/O, runs an event loop or reads a clock (callers pass
``now_ms``), so each format can be tested, fuzzed and read on its own.

Owns (normative text in protocols/, vectors in protocols/vectors/):

- ``canonical``: canonical JSON, the one encoding of every signed object;
- ``envelope``: signed envelopes and their body schemas;
- ``shards``: ledger shard names ``<node_id>/<segment>``;
- ``link_frames`` and ``link``: the node-to-node link's frames and its sans-IO state machine;
- ``forwarding``: the forwarding API's request and reply bodies, paths and limits (the contract
  between a node's uplink and the switch; it belongs to neither);
- ``cards``: card numbers, what a card reader hands over and the card sealed to the switch;
- ``acquirer`` and ``iso8583``: a sale as the acquirer sees it, ISO 8583 framing, messages
  and matching (the TCP/TLS driver is meshpos.acquirer.iso8583_link);
- ``dnssd``: the DNS-SD service type, instance names and TXT record (the mDNS driver is
  meshpos.replication.discovery).

May import: pure standard-library modules; nacl and cryptography (signatures, sealed cards);
iso8583 (the field codec); and the neutral helpers meshpos.domain.errors, meshpos.domain.rules,
meshpos.domain.policy, meshpos.domain.currency and meshpos.identity.keys. NOT trio, asyncio, socket, ssl,
sqlite3, subprocess, threading, automerge, zeroconf, file I/O, nor any other meshpos package.
The contract ``wire-pure`` in pyproject.toml ([tool.importlinter]) and
tests/test_architecture.py check this.
"""
