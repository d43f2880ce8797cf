"""Automerge calls on bytes a peer (or a damaged file) supplies: every way they fail is an
``EncodingError``.

The Python binding raises a bare ``Exception`` on most bad input. On some input that passes its
parsing and checksums (a change whose predecessor names an actor index past the change's actor
table: automerge 0.5.7, ``apply_change``, "index out of bounds"), its Rust code panics instead,
and pyo3 raises ``pyo3_runtime.PanicException``, which derives from ``BaseException``: it passes
every ``except Exception`` up to the event loop and stopped the node at one PUSH of an enrolled
peer. A panic also poisons the document's lock: every later call on that document raises
"poisoned lock". So a panic is ``AutomergePanic``, and whoever owns the document drops it (the
ledger reloads the shard from its store; a scratch or parked document is thrown away).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from meshpos.domain.errors import EncodingError


class AutomergePanic(EncodingError):
    """Automerge's Rust code panicked on the input: the document it worked on is unusable."""


def is_panic(exc: BaseException) -> bool:
    """A Rust panic raised through pyo3 (its class is not importable: pyo3 makes it at run time)."""
    kind = type(exc)
    return kind.__name__ == "PanicException" and kind.__module__ == "pyo3_runtime"


@contextmanager
def automerge_input(what: str) -> Iterator[None]:
    """Around Automerge calls on untrusted bytes: ``EncodingError("{what}: ...")`` for anything
    Automerge raises, ``AutomergePanic`` for a panic; anything else (a cancellation, an interrupt)
    passes unchanged."""
    try:
        yield
    except Exception as exc:  # automerge raises bare Exception on bad input
        raise EncodingError(f"{what}: {exc}") from exc
    except BaseException as exc:
        if not is_panic(exc):
            raise
        raise AutomergePanic(f"{what}: Automerge failed inside ({exc})") from exc
