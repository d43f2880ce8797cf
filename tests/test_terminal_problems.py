"""Error messages of the terminal API: card numbers blanked, the node's own sale ids kept whole."""

from __future__ import annotations

from meshpos.terminal.problems import redact


def test_a_sale_id_whose_hex_ends_in_digits_is_not_taken_for_a_card_number() -> None:
    # "9815-00000003" is 12 digits with a dash: the free-text rule alone took it for a card number
    # (seen when a node id happened to end in four digits: the 409 message lost its sale id)
    text = "Idempotency-Key 'k' was used for another request (sale 5626ef1b4a2e9815-00000003)"
    assert redact(text) == text


def test_a_card_number_beside_a_sale_id_is_still_blanked() -> None:
    text = "sale 5626ef1b4a2e9815-00000003: amount '4111 1111 1111 1111' is not an amount"
    assert redact(text) == "sale 5626ef1b4a2e9815-00000003: amount '[card number removed]' is not an amount"
    assert "4111" not in redact("4111111111111111 and 5626ef1b4a2e9815-00000003 and 4111-1111-1111-1111")
