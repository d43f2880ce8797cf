"""Devices: receipt printers (python-escpos), the durable receipt spool, card readers.

Modules: ``profiles`` (the ``devices/`` folder and printer profiles), ``receipts``
(layout and rendering), ``printers`` (printer configs and transports), ``spool``
(the durable queue and its trio worker), ``reader`` (card readers).
"""
