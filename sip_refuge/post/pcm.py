"""``audioop``, imported once and quietly: the C routines for 16-bit audio (mix, gain, rate conversion, G.711).

Python 3.11 and 3.12 deprecate it (PEP 594) and we run with warnings as errors; Python 3.13 removed it, and the
``audioop-lts`` package (a dependency on 3.13 and later, see setup.cfg) puts the same module back.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*audioop.*", category=DeprecationWarning)
    import audioop

__all__ = ["audioop"]
