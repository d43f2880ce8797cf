"""python-escpos, imported without the directory it would leave in /tmp.

When ``escpos.capabilities`` is first imported (by any part of python-escpos), it pickles its
printer database into ``$ESCPOS_CAPABILITIES_PICKLE_DIR`` or, when that is unset, into a new
``tempfile.mkdtemp()`` that nothing ever removes: ~76 kB in the temporary directory for every
process that checks a printer profile, renders a receipt or prints one (each CLI call, each
node start), for as long as the device runs; on a terminal whose /tmp is in RAM that is memory.
The pickle is read only during that import, and the module keeps the directory's name
(``pickle_dir``), so :func:`load` removes that directory right after the import.

A directory the operator names in the variable is left alone (python-escpos reuses its pickle
there; it still makes an empty directory in /tmp then, which cannot be told apart from another
process's).
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

PICKLE_DIR_VAR = "ESCPOS_CAPABILITIES_PICKLE_DIR"
_lock = threading.Lock()  # printers import python-escpos in worker threads


def load() -> None:
    """Import ``escpos.capabilities`` once per process, leaving nothing behind; call before any
    ``from escpos ... import``."""
    if "escpos.capabilities" in sys.modules:
        return
    with _lock:
        if "escpos.capabilities" in sys.modules:
            return
        operators = os.environ.get(PICKLE_DIR_VAR)
        module = importlib.import_module("escpos.capabilities")
        made = getattr(module, "pickle_dir", None)
        # only the directory it made in the temporary directory (a later python-escpos may keep
        # its pickle elsewhere, or no longer say where)
        if not operators and isinstance(made, str) and Path(made).parent == Path(tempfile.gettempdir()):
            shutil.rmtree(made, ignore_errors=True)
