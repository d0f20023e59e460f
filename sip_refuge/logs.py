"""Logging set-up shared by every part: one format, and secrets masked on every line."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sip_refuge.config.secrets import mask_url


class MaskingFilter(logging.Filter):
    """Renders the message once, masks it, and stores the masked text (so handlers never see a secret)."""

    def __init__(self, mask: Callable[[str], str] = mask_url) -> None:
        super().__init__()
        self.mask = mask

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self.mask(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        record.msg, record.args = masked, None
        return True


def setup_logging(verbose: bool = False, mask: Callable[[str], str] = mask_url, prefix: str = "") -> None:
    """Configure the root logger; ``prefix`` (e.g. ``post=sutton-market``) goes on every line."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    head = f"{prefix} " if prefix else ""
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {head}%(name)s: %(message)s"))
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in root.handlers:
        for old in [f for f in handler.filters if isinstance(f, MaskingFilter)]:
            handler.removeFilter(old)
        handler.addFilter(MaskingFilter(mask))
