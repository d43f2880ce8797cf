"""Writing SVG markup that is safe to put inline in a page: one escape, one element builder.

Every text and attribute value goes through :func:`esc`: ``& < > " '`` become entities and a
character XML 1.0 does not allow (most control characters, lone surrogates, U+FFFE/U+FFFF) becomes
U+FFFD, so a name (a node's, from its certificate) can neither break the markup nor stop a
browser's XML parser. Attribute names are ours, never data. Pure.
"""

from __future__ import annotations

import re

SVG_NS = "http://www.w3.org/2000/svg"

_NOT_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}
_ATTR_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9-]*")


def esc(value: object) -> str:
    text = _NOT_XML.sub("\ufffd", str(value))
    return "".join(_ENTITIES.get(ch, ch) for ch in text)


def num(value: float) -> str:
    """A coordinate: at most one decimal, no exponent, no "-0"."""
    text = f"{round(value, 1):.1f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def el(tag: str, attrs: dict[str, object] | None = None, *children: str, text: object = None) -> str:
    """``<tag a="v" ...>children or text</tag>``; an attribute whose value is None is left out; floats
    are written with :func:`num`."""
    parts = [tag]
    for name, value in (attrs or {}).items():
        if value is None:
            continue
        if not _ATTR_NAME.fullmatch(name):
            raise ValueError(f"not an attribute name: {name!r}")
        shown = num(value) if isinstance(value, float) else value
        parts.append(f'{name}="{esc(shown)}"')
    inner = "".join(children) + ("" if text is None else esc(text))
    return f"<{' '.join(parts)}>{inner}</{tag}>"


def document(width: float, height: float, label: str, *children: str, cls: str,
             attrs: dict[str, object] | None = None) -> str:
    """A whole ``<svg>`` element, sized by its viewBox (it scales to the width of its box)."""
    return el("svg", {"xmlns": SVG_NS, "class": cls, "viewBox": f"0 0 {num(width)} {num(height)}",
                      "role": "img", "aria-label": label, **(attrs or {})},
              el("title", None, text=label), *children)
