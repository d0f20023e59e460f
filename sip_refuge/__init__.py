"""sip-refuge: open, standards-based street refuge points."""

__version__ = "0.1.0"
