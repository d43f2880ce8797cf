"""Who may write what: the verification context of a site.

The roster holds the site CA, the certificates seen (``cert`` entries), the
revocations (``revocation`` entries) and the current policy. ``verify`` is the
single gate every envelope passes before a node accepts it, whatever its
origin (local, a peer, the switch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from cryptography import x509

from meshpos.domain.roles import ROLES, SELLING_ROLES
from meshpos.domain import rules
from meshpos.domain.errors import VerificationError
from meshpos.identity import certs, keys, sigcheck
from meshpos.domain.policy import SitePolicy
from meshpos.wire import envelope as env_mod
from meshpos.wire.envelope import Envelope

log = logging.getLogger(__name__)

PRESIGN_MIN = 8  # below this, the hand-off to the helper process costs more than it saves
PRESIGN_BACKLOG = 128  # signatures the helpers may be behind (~6 ms of their work) before none are sent


class FreeTextError(VerificationError):
    """An entry's free text breaks the text rule (a card number, control characters): the entry is
    kept out of the ledger and never relayed, whoever signed it (protocols/rules.md, "Free text")."""


class UnknownSigner(VerificationError):
    """The signer's certificate has not reached this node yet: retry later."""


@dataclass(frozen=True)
class Verified:
    env: Envelope
    key: str  # ledger key this entry lives under


def entry_key(env: Envelope) -> str:
    """The ledger key of an envelope: fixed by its content, so a peer cannot move it."""
    b = env.body
    if env.type in ("sale", "void", "result", "reversal"):
        return f"{env.type}/{b['sale_id']}"
    if env.type == "cert":
        return f"cert/{env.signer}"
    if env.type == "revocation":
        return f"revocation/{b['node_id']}"
    if env.type == "policy":
        return f"policy/{b['policy'].get('version')}"
    if env.type == "lease":
        return f"lease/{b['holder']}/{b['scope']}/{b['granted_at']}"
    return f"status/{env.signer}"


class Roster:
    def __init__(self, ca_cert: x509.Certificate, policy: SitePolicy) -> None:
        self.ca_cert = ca_cert
        self.site_id = certs.site_id_of(ca_cert)
        self.ca_key = certs.ca_public_key(ca_cert)
        if policy.site_id != self.site_id:
            raise VerificationError("policy belongs to another site")
        self.policy = policy  # the highest version: what this node sells under now
        self.policies: dict[int, SitePolicy] = {policy.version: policy}
        self.identities: dict[str, certs.NodeIdentity] = {}
        self.revocations: dict[str, dict[str, object]] = {}  # node id -> the revocation's body
        # (public key, raw) -> where the helper process answers for its signature
        self._presigned: dict[tuple[bytes, bytes], tuple[sigcheck.Batch, int]] = {}

    # -- learning ---------------------------------------------------------------

    def add_cert_der(self, der: bytes) -> certs.NodeIdentity:
        ident = certs.verify_node_cert(certs.load_der(der), self.ca_cert, now_ms=None)
        self.identities[ident.node_id] = ident
        return ident

    def apply(self, env: Envelope) -> None:
        """Take the effect of a verified roster-changing entry."""
        if env.type == "cert":
            ident = certs.verify_node_cert(
                certs.load_der(env_mod.b64d(env.body["cert"], "cert")), self.ca_cert,
                now_ms=None)
            self.identities.setdefault(ident.node_id, ident)
        elif env.type == "revocation":
            self.revocations.setdefault(env.body["node_id"], dict(env.body))
        elif env.type == "policy":
            policy = SitePolicy.from_json(env.body["policy"], "policy entry")
            if policy.site_id != self.site_id:
                return
            self.policies.setdefault(policy.version, policy)
            if policy.version > self.policy.version:
                self.policy = policy

    @property
    def revoked(self) -> dict[str, int]:
        """node id -> the time of its revocation (the cut itself is in ``revocations``)."""
        return {node_id: int(str(body["at"])) for node_id, body in self.revocations.items()}

    def policy_at(self, at_ms: int) -> SitePolicy:
        """The policy version in force at ``at_ms`` (protocols/rules.md, "Policy in force")."""
        return rules.policy_at(self.policies.values(), at_ms)

    def beyond_cut(self, node_id: str, seq: int | None, at_ms: int) -> bool:
        """Whether an entry of ``node_id`` falls after its revocation's cut (False if not revoked)."""
        revocation = self.revocations.get(node_id)
        return revocation is not None and rules.beyond_cut(revocation, seq, at_ms)

    def identity(self, node_id: str) -> certs.NodeIdentity:
        ident = self.identities.get(node_id)
        if ident is None:
            raise UnknownSigner(f"no certificate known for node {node_id}")
        return ident

    def name_of(self, node_id: str) -> str:
        ident = self.identities.get(node_id)
        return ident.name if ident else node_id

    # -- the gate ---------------------------------------------------------------

    # -- signatures, checked in bulk when a whole shard arrives ---------------------------

    def _check_sig(self, env: Envelope, public_key: bytes) -> None:
        pending = self._presigned.pop((public_key, env.raw), None)
        if pending is not None and pending[0].ready() and pending[0].valid(pending[1]):
            return
        # not answered yet (the helper works from the other end of the merge), or not valid
        env_mod.check_signature(env, public_key)

    def presign(self, envs: list[Envelope]) -> bool:
        """Have the Ed25519 signatures of many envelopes checked in the helper process while
        this one goes on: ``verify`` takes the answers that are in when it gets to an envelope
        and checks the signature itself otherwise, never waiting (so a caller hands the batches
        from the far end first, and the two meet in the middle). The answers are only a cache:
        ``verify`` still runs every rule, and an envelope whose signer is not known yet is left
        to it. Nothing is sent (False) while the helpers are PRESIGN_BACKLOG signatures behind."""
        if sigcheck.POOL.outstanding() >= PRESIGN_BACKLOG:
            return False
        jobs, marks = [], []
        for env in envs:
            if env.type in ("revocation", "policy"):
                public_key = self.ca_key
            elif env.type not in ("result", "reversal") and env.signer in self.identities:
                public_key = self.identities[env.signer].public_key
            else:
                continue
            jobs.append((public_key, env.signed_bytes(), env.sig))
            marks.append((public_key, env.raw))
        if len(jobs) < PRESIGN_MIN:
            return True
        batch = sigcheck.POOL.submit(jobs)
        for i, mark in enumerate(marks):
            self._presigned[mark] = (batch, i)
        return True

    def forget_presigned(self) -> None:
        """Drop the answers not asked for (the helpers' late answers are read, unused, later)."""
        self._presigned.clear()

    def verify(self, env: Envelope, now_ms: int, key: str | None = None, *,
               schema_checked: bool = False) -> Verified:
        """Raise VerificationError / EncodingError unless ``env`` may enter the ledger.
        ``schema_checked``: the caller ran ``envelope.check_schema(env)`` already (the switch
        does, for every sale of a batch): not run a second time."""
        if not schema_checked:
            env_mod.check_schema(env)
        site = env.body.get("site")
        if site is not None and site != self.site_id:
            raise VerificationError(f"{env.type} entry of another site ({site})")
        text_problem = rules.free_text_problem(env.type, env.body)
        if text_problem is not None:
            raise FreeTextError(f"{env.type} entry not taken (nor relayed): {text_problem}")
        expected_key = entry_key(env)
        if key is not None and key != expected_key:
            raise VerificationError(f"{env.type} entry stored under the wrong key {key!r}")
        getattr(self, f"_verify_{env.type}")(env, now_ms)
        return Verified(env=env, key=expected_key)

    def _signer_ok(self, env: Envelope, at_ms: int, roles: frozenset[str],
                   seq: int | None = None) -> certs.NodeIdentity:
        ident = self.identity(env.signer)
        if self.beyond_cut(env.signer, seq, at_ms):
            raise VerificationError(f"{env.type} entry by revoked node {ident.name} ({env.signer}) "
                                    "after its revocation's cut")
        return self._authentic(env, ident, at_ms, roles)

    def revoked_sale_beyond_cut(self, env: Envelope) -> bool:
        """True for an authentic sale of a revoked terminal that falls after its revocation's cut
        (raises like ``verify`` if it is not authentic): the switch settles such a sale
        ``rejected`` with a signed result instead of only refusing it."""
        env_mod.check_schema(env)
        if env.type != "sale" or not self.beyond_cut(env.signer, env.body["seq"], env.body["created_at"]):
            return False
        if env.body["site"] != self.site_id:
            raise VerificationError(f"sale entry of another site ({env.body['site']})")
        self._authentic(env, self.identity(env.signer), env.body["created_at"], SELLING_ROLES)
        return True

    def _authentic(self, env: Envelope, ident: certs.NodeIdentity, at_ms: int,
                   roles: frozenset[str]) -> certs.NodeIdentity:
        if ident.role not in roles:
            raise VerificationError(f"role {ident.role} of {ident.name} may not write {env.type} entries")
        if not ident.not_before_ms <= at_ms <= ident.not_after_ms:
            raise VerificationError(f"certificate of {ident.name} not valid at the entry's time")
        self._check_sig(env, ident.public_key)
        return ident

    def _verify_sale(self, env: Envelope, now_ms: int) -> None:
        self._signer_ok(env, env.body["created_at"], SELLING_ROLES, seq=env.body["seq"])

    def _verify_void(self, env: Envelope, now_ms: int) -> None:
        if not env.body["sale_id"].startswith(env.signer + "-"):
            raise VerificationError("a void may only be written by the sale's own terminal")
        seq = rules.seq_of(env.body["sale_id"], env.signer)
        # a revoked terminal's void counts with its sale (up to the cut) and only if written by then
        if seq is not None and self.beyond_cut(env.signer, None, env.body["at"]):
            raise VerificationError(f"void by revoked node {env.signer} dated after the revocation")
        self._signer_ok(env, env.body["at"], SELLING_ROLES, seq=seq)

    def _verify_result(self, env: Envelope, now_ms: int) -> None:
        if env.signer != "switch":
            raise VerificationError("settlement results are signed by the switch only")
        key = self.policy.switch_key_bytes
        if key is None:
            raise UnknownSigner("this site's policy names no switch key yet")
        keys.verify_by_x25519(key, env.signed_bytes(), env.sig)

    _verify_reversal = _verify_result

    def _verify_cert(self, env: Envelope, now_ms: int) -> None:
        der = env_mod.b64d(env.body["cert"], "cert")
        ident = certs.verify_node_cert(certs.load_der(der), self.ca_cert, now_ms=None)
        if ident.node_id != env.signer:
            raise VerificationError("cert entry must be written by the certificate's own node")
        self._check_sig(env, ident.public_key)

    def _verify_ca_signed(self, env: Envelope, now_ms: int) -> None:
        if env.signer != self.site_id:
            raise VerificationError(f"{env.type} entries are signed by the site CA only")
        self._check_sig(env, self.ca_key)

    _verify_revocation = _verify_ca_signed

    def _verify_policy(self, env: Envelope, now_ms: int) -> None:
        self._verify_ca_signed(env, now_ms)
        SitePolicy.from_json(env.body["policy"], "policy entry")

    def _verify_lease(self, env: Envelope, now_ms: int) -> None:
        if env.body["holder"] != env.signer:
            raise VerificationError("a lease is written by its holder")
        self._signer_ok(env, env.body["granted_at"], SELLING_ROLES)

    def _verify_status(self, env: Envelope, now_ms: int) -> None:
        if env.signer in self.revocations:
            raise VerificationError(f"status of revoked node {env.signer}")
        self._signer_ok(env, now_ms, frozenset(ROLES))


def decode_and_verify(roster: Roster, raw: bytes, now_ms: int, key: str | None = None) -> Verified:
    return roster.verify(env_mod.decode(raw), now_ms, key)
