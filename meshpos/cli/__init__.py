"""The ``meshpos`` command."""
