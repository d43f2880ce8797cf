"""Site CA, device keys and certificates, enrollment."""
