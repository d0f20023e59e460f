"""The site file: one YAML file that describes a control room, its desks and its posts."""

from sip_refuge.config.loader import load_site
from sip_refuge.config.model import (
    Ami,
    Camera,
    CctvTarget,
    Desk,
    Gpio,
    HttpLimits,
    Location,
    Networks,
    Pbx,
    Post,
    Queue,
    Secret,
    SelfTest,
    Sidecar,
    Site,
    Tls,
)

__all__ = [
    "Ami", "Camera", "CctvTarget", "Desk", "Gpio", "HttpLimits", "Location", "Networks", "Pbx", "Post", "Queue",
    "Secret", "SelfTest", "Sidecar", "Site", "Tls", "load_site",
]
