"""The terminal API (``/v1``): what a POS app, or the cashier app, calls on its own terminal.

HTTP/1.1 + JSON, served by Starlette on Hypercorn's trio worker inside the running node, on two
transports: ``NODE_DIR/api.sock`` (UNIX socket) and a TCP listener (config ``api``). The document
of record is ``protocols/terminal-api.yaml`` (OpenAPI 3.1).

Modules: ``events`` (the event journal behind ``GET /v1/events``, no HTTP), ``sales`` (idempotent
create, listing, void: no HTTP), ``feed`` (ledger and node state into the journal), ``guard``
(token, Host and Origin checks), ``app`` (the routes), ``server`` (the node component),
``cashier`` (the cashier app's PIN login, lock-out and sessions, no HTTP), ``cashier_app`` (the
page at ``/``, its files in ``cashier_static/``, and its login routes).

Layer: above ``node`` (it drives a NodeService), below ``apps`` and ``cli``.
"""
