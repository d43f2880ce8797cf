"""The receipt message catalogue: one dict per language, the same keys in each.

A terminal picks its language by code (``"language": "it"`` in the node
config). Adding a language is adding one dict here; ``tests/test_receipts.py``
checks that every language has exactly the keys English has.
"""

from __future__ import annotations

from collections.abc import Mapping

from meshpos.domain.errors import ConfigError

_EN: dict[str, str] = {
    "decimal_sep": ".",
    "terminal": "Terminal",
    "title_card": "CARD PAYMENT",
    "title_cash": "CASH PAYMENT",
    "title_outcome": "PAYMENT RESULT",
    "copy_customer": "Customer copy",
    "copy_merchant": "Merchant copy",
    "copy_outcome": "Final result",
    "date": "Date",
    "sale_date": "Sale date",
    "reference": "Ref",
    "total": "TOTAL",
    "card": "Card",
    "entry": "Entry",
    "entry_chip": "chip",
    "entry_contactless": "contactless",
    "entry_magstripe": "magnetic stripe",
    "entry_manual": "manual entry",
    "paid_cash": "Paid in cash",
    "pending_head": "AUTHORIZATION PENDING",
    "pending_body": (
        "Payment not yet confirmed. This payment was taken offline and will be "
        "sent to the card issuer for authorization as soon as a connection is available."
    ),
    "pending_deadline": "Decision by",
    "pending_merchant": "Offline sale: stored and forwarded by the site mesh.",
    "approved_head": "APPROVED",
    "approved_body": "Payment authorized.",
    "auth_code": "Auth code",
    "declined_head": "DECLINED",
    "declined_body": "Payment declined. The card was not charged.",
    "response_code": "Response code",
    "expired_head": "EXPIRED",
    "expired_body": (
        "Not authorized within the offline window. The card was not charged."
    ),
    "voided_head": "VOIDED",
    "voided_body": "This sale was cancelled. Nothing is due.",
    "cash_voided_body": "This sale was cancelled and the cash refunded.",
    "keep_customer": "Keep this receipt.",
    "keep_merchant": "Keep for your records.",
    "rc_05": "do not honour",
    "rc_14": "invalid card number",
    "rc_51": "insufficient funds",
    "rc_54": "expired card",
    "rc_91": "issuer unavailable",
}

_IT: dict[str, str] = {
    "decimal_sep": ",",
    "terminal": "Terminale",
    "title_card": "PAGAMENTO CON CARTA",
    "title_cash": "PAGAMENTO IN CONTANTI",
    "title_outcome": "ESITO PAGAMENTO",
    "copy_customer": "Copia cliente",
    "copy_merchant": "Copia esercente",
    "copy_outcome": "Esito definitivo",
    "date": "Data",
    "sale_date": "Data vendita",
    "reference": "Rif",
    "total": "TOTALE",
    "card": "Carta",
    "entry": "Lettura",
    "entry_chip": "chip",
    "entry_contactless": "contactless",
    "entry_magstripe": "banda magnetica",
    "entry_manual": "inserimento manuale",
    "paid_cash": "Pagato in contanti",
    "pending_head": "AUTORIZZAZIONE IN ATTESA",
    "pending_body": (
        "Pagamento non ancora confermato. Il pagamento è stato registrato offline e "
        "sarà inviato all'emittente della carta per l'autorizzazione appena la rete "
        "sarà disponibile."
    ),
    "pending_deadline": "Esito entro",
    "pending_merchant": "Vendita offline: conservata e inoltrata dalla rete del sito.",
    "approved_head": "APPROVATO",
    "approved_body": "Pagamento autorizzato.",
    "auth_code": "Cod. autorizz.",
    "declined_head": "RIFIUTATO",
    "declined_body": "Pagamento rifiutato. La carta non è stata addebitata.",
    "response_code": "Codice risposta",
    "expired_head": "SCADUTO",
    "expired_body": (
        "Non autorizzato entro la finestra offline. La carta non è stata addebitata."
    ),
    "voided_head": "ANNULLATO",
    "voided_body": "Vendita annullata. Nulla è dovuto.",
    "cash_voided_body": "Vendita annullata e contanti restituiti.",
    "keep_customer": "Conservare lo scontrino.",
    "keep_merchant": "Da conservare per l'esercente.",
    "rc_05": "transazione negata",
    "rc_14": "numero carta non valido",
    "rc_51": "fondi insufficienti",
    "rc_54": "carta scaduta",
    "rc_91": "emittente non disponibile",
}

CATALOGUE: dict[str, dict[str, str]] = {"en": _EN, "it": _IT}


def messages(language: str) -> Mapping[str, str]:
    """The catalogue for one language code; ConfigError names the known ones."""
    if not isinstance(language, str) or language not in CATALOGUE:
        known = ", ".join(sorted(CATALOGUE))
        raise ConfigError(f"unknown receipt language {language!r}: use one of {known}")
    return CATALOGUE[language]
