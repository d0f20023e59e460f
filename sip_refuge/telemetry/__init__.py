"""The telemetry message a post agent sends its sidecar: ``POST /api/v1/posts/ID/telemetry``.

Shared by both sides, so neither imports the other's package for it: the post's runner builds a
:class:`Telemetry` (:meth:`Telemetry.build`), its outbox keeps and sends :meth:`Telemetry.to_json`, and
the sidecar reads the body with :meth:`Telemetry.from_json`, which refuses anything malformed or
oversized with a :class:`TelemetryError` naming the field. Only a valid message reaches the hub, the
store, the JSON API and the pages.

On the wire it is one flat JSON object, as posts of earlier versions send it (docs/spec.md, section 7):
the fields every report carries, ``kind``, and that kind's own fields beside them. Fields this version
does not know are checked against the same bounds, then ignored.
"""


from sip_refuge.telemetry.message import (
    CallReport,
    Detail,
    FaultChange,
    Kind,
    RegistrationChange,
    SelfTest,
    SelfTestReport,
    SelfTestResult,
    StateChange,
    Telemetry,
    shown_status,
)
from sip_refuge.telemetry.reading import (
    MAX_BYTES,
    MAX_DEPTH,
    MAX_INT,
    MAX_ITEMS,
    MAX_KEYS,
    MAX_NAME,
    MAX_TEXT,
    TelemetryError,
)

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_INT", "MAX_ITEMS", "MAX_KEYS", "MAX_NAME", "MAX_TEXT", "CallReport",
           "Detail", "FaultChange", "Kind", "RegistrationChange", "SelfTest", "SelfTestReport", "SelfTestResult",
           "StateChange", "Telemetry", "TelemetryError", "shown_status"]
