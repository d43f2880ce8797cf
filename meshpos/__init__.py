"""meshpos: offline card payments replicated across every terminal of one event."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
