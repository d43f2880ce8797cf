"""Neutral helpers over outside systems (databases), usable by the node side and the switch alike.

May import the standard library and ``meshpos.domain.errors`` only: nothing of the node or the switch."""
