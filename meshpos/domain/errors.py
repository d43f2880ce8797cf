"""The public error tree.

Every component translates what goes wrong at its boundary into one of these
(``raise ... from exc``); the CLI maps them to one message and an exit code in
one place (``meshpos.cli.main``).
"""

from __future__ import annotations


class MeshposError(Exception):
    """Base of every error meshpos raises on purpose."""

    exit_code = 1


class InputError(MeshposError):
    """A value given by a person or a script is not acceptable (amount, PAN, currency...)."""

    exit_code = 2


class PolicyError(MeshposError):
    """A sale breaks the site's offline rules (a cap, the window, a missing switch key)."""

    exit_code = 3


class ContentError(PolicyError):
    """A validly signed entry breaks a content rule (meshpos.domain.rules): kept out of views,
    totals and caps, shown as refused with this message, never failing its neighbours."""


class ConfigError(MeshposError):
    """A site, node or switch directory, or a config file, is missing, foreign or malformed."""

    exit_code = 4


class CryptoError(MeshposError):
    """A key, certificate or sealed box could not be used."""

    exit_code = 5


class VerificationError(CryptoError):
    """A signed object failed verification: signature, chain, validity, revocation or role."""


class EncodingError(MeshposError):
    """Bytes from outside do not decode as the format they claim to be."""

    exit_code = 5


class StoreError(MeshposError):
    """The durable store could not be opened or written."""

    exit_code = 6


class CorruptStoreError(StoreError):
    """A store or ledger file is damaged; the message names the file."""


class DiskFullError(StoreError):
    """The disk holding a store is full: the write was refused whole (SQLite rolls it back), so
    nothing already acknowledged is lost; new sales are refused until space is freed. Never a
    damaged database: moving the store aside would discard unreplicated sales."""

    exit_code = 11


class LockedError(StoreError):
    """Another process holds the node directory."""


class ProtocolError(MeshposError):
    """A peer broke the link protocol (bad frame, oversize, wrong order, timeout)."""

    exit_code = 7


class DeviceError(MeshposError):
    """A printer, card reader or modem failed or is misconfigured."""

    exit_code = 8


class PrinterError(DeviceError):
    """The receipt printer is unreachable, out of paper, or misconfigured."""


class AcquirerError(MeshposError):
    """The acquirer host could not be reached or answered something unusable."""

    exit_code = 9


class UplinkError(MeshposError):
    """The switch could not be reached or refused a batch."""

    exit_code = 9


class NodeNotRunningError(MeshposError):
    """No node answers on the terminal API socket (api.sock) of this node directory."""

    exit_code = 10
