"""Talking to a post agent's local control socket: which port it listens on, and one request and its answer.

The agent serves the socket (``sip_refuge.post.control``); ``sip-refuge press``/``status``, the demo and the
sidecar's press route are its clients. The client lives here, apart from the post package, so the sidecar can
use it without importing the post agent.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from sip_refuge.config.model import Post, Site
from sip_refuge.errors import RefugeError

DEFAULT_BASE_PORT = 7400  # post N of the site listens on 7400 + N unless it sets control_port
MAX_LINE = 4096  # bytes of one request line the agent reads


def control_port(site: Site, post: Post) -> int:
    if post.control_port is not None:
        return post.control_port
    return DEFAULT_BASE_PORT + [p.id for p in site.posts].index(post.id)


def ask(port: int, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to a running agent; a clear error when none listens."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(json.dumps(request).encode() + b"\n")
            data = conn.makefile("rb").readline(1 << 20)
    except OSError as exc:
        raise RefugeError(f"no post agent answers on 127.0.0.1:{port} ({exc.strerror or exc}); "
                          "is `sip-refuge post` running?") from None
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise RefugeError(f"the agent on 127.0.0.1:{port} gave no usable answer ({data[:80]!r})")
    return reply
