"""What the switch process does to itself before it holds opened card numbers.

It opens sealed card data, so the full card numbers of every sale it advises pass
through its memory. A core dump (a crash, ``gcore``, a ``kill -SEGV``) would write
them to disk, and a dumpable process lets any process of the same user read its
memory through ``/proc/PID/mem`` or ptrace. ``meshpos switch run`` therefore sets
``RLIMIT_CORE`` to 0 (soft and hard) and, on Linux, ``prctl(PR_SET_DUMPABLE, 0)``
(which also makes ``/proc/PID/*`` owned by root and refuses ptrace by the same user).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
import sys

from meshpos.domain.errors import ConfigError

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4  # linux/prctl.h
PR_GET_DUMPABLE = 3


def disable_core_dumps() -> None:
    """No core file, ever, and (Linux) not dumpable. ConfigError if the OS refuses."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot disable core dumps (RLIMIT_CORE): {exc}") from exc
    if not sys.platform.startswith("linux"):
        log.warning("core dumps limited to 0 bytes; PR_SET_DUMPABLE exists on Linux only")
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 or libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise ConfigError(f"cannot make the switch process non-dumpable (prctl errno {ctypes.get_errno()})")


__all__ = ["disable_core_dumps"]
