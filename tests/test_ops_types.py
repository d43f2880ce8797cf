"""The typed control operations: read back with from_jsonable, written by the one encoder."""

from __future__ import annotations

import pytest

from meshpos.domain.errors import InputError
from meshpos.domain.jsonable import from_jsonable, json_object
from meshpos.node.ops import PolicyView, SealedCard, SellRequest, UplinkRequest


def test_a_request_round_trips_through_the_encoder() -> None:
    req = SellRequest(1250, SealedCard("visa", "1111", "manual", "AAAA"), "polenta")
    assert json_object(req) == {"amount_minor": 1250, "description": "polenta",
                                "card": {"brand": "visa", "last4": "1111", "entry_mode": "manual", "sealed": "AAAA"}}
    assert from_jsonable(SellRequest, json_object(req)) == req
    assert from_jsonable(SellRequest, {"amount_minor": 5}) == SellRequest(5)  # defaults may be left out
    view = PolicyView("EUR", None, "s", "Sagra", 86400)
    assert from_jsonable(PolicyView, json_object(view)) == view


@pytest.mark.parametrize("body, message", [
    ([], "must be a JSON object"),
    ({}, "amount_minor is missing"),
    ({"amount_minor": "12"}, "amount_minor must be an integer"),
    ({"amount_minor": True}, "amount_minor must be an integer"),  # a bool is no amount
    ({"amount_minor": 1, "tip": 2}, "unknown members ['tip']"),
    ({"amount_minor": 1, "card": {"brand": "visa"}}, "card: last4 is missing"),
    ({"amount_minor": 1, "card": "4111111111111111"}, "card must be a JSON object"),
    ({"amount_minor": 1, "description": 7}, "description must be a string"),
])
def test_a_malformed_request_is_an_input_error_naming_the_member(body: object, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_jsonable(SellRequest, body)


def test_uplink_takes_only_a_boolean() -> None:
    assert from_jsonable(UplinkRequest, {"on": False}) == UplinkRequest(False)
    with pytest.raises(InputError, match="on must be true or false"):
        from_jsonable(UplinkRequest, {"on": 1})


def test_a_sealed_card_that_is_not_base64_is_an_input_error() -> None:
    with pytest.raises(InputError, match="malformed card capture"):
        SealedCard("visa", "1111", "manual", "not base64!").capture()
