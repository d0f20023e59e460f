"""The dashboard's site plan: where each post goes, and what colour its state gives it.

Nothing is fetched from anywhere: the plan is an SVG drawn by the sidecar. With ``site.plan`` its background
is the site's own picture, stretched over its bounds, and a post goes where its latitude and longitude fall
between them. Without one the posts alone are drawn on a plain equirectangular projection around their
centroid (east-west distances shrunk by the cosine of its latitude), fitted to the drawing: at a site's
scale, a few kilometres, that is as good as a map projection gets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sip_refuge.config.model import Site

WIDTH = 1000.0  # the drawing's units (SVG viewBox): the page scales it to fit
PLAIN_HEIGHT = 560.0
MARGIN = 80.0  # room around the outermost posts of a plain plan for their markers and names
METRES_PER_DEGREE = 111_320.0  # of latitude (and of longitude at the equator)
LABEL_ABOVE, LABEL_BELOW = -36.0, 56.0  # a name's baseline from its marker's centre, in the drawing's units
CHAR_WIDTH, LABEL_HEIGHT = 15.0, 30.0  # about the size of a name at the plan's 26-unit bold type
DOT = 20.0  # a marker's radius
# (state, words) in the legend's order. A post's marker takes the first that holds.
STATES = (("offline", "Offline"), ("calling", "Calling"), ("answered", "Answered"), ("fault", "Fault"),
          ("unknown", "Not heard from yet"), ("idle", "Idle"))


@dataclass(frozen=True)
class Marker:
    post_id: str
    name: str
    x: float
    y: float
    label_dy: float = LABEL_ABOVE  # where its name goes: above the marker, or below when that would cover another
    label_dx: float = 0.0  # and sideways, to keep it inside the drawing


@dataclass(frozen=True)
class Drawing:
    width: float
    height: float
    image: bool  # the site's picture is the background
    markers: tuple[Marker, ...]
    off_plan: tuple[str, ...]  # names of posts the plan cannot show (no lat/lon, or outside the picture)
    scale_metres: int  # a round distance for the scale bar ...
    scale_length: float  # ... and its length in the drawing's units


def draw(site: Site) -> Drawing:
    located = [(p.id, p.name, p.location.lat, p.location.lon) for p in site.posts
               if p.location.lat is not None and p.location.lon is not None]
    missing = [p.name for p in site.posts if p.location.lat is None or p.location.lon is None]
    if site.plan is not None:
        plan = site.plan
        mid_lat = math.radians((plan.south + plan.north) / 2)
        width_m = (plan.east - plan.west) * math.cos(mid_lat) * METRES_PER_DEGREE
        height_m = (plan.north - plan.south) * METRES_PER_DEGREE
        # The longer side is WIDTH units, so markers and names have the same size on any plan's shape.
        units = WIDTH / max(width_m, height_m)  # per metre
        width, height = width_m * units, height_m * units
        markers: list[Marker] = []
        outside: list[str] = []
        for post_id, name, lat, lon in located:
            if plan.south <= lat <= plan.north and plan.west <= lon <= plan.east:
                markers.append(Marker(post_id, name, (lon - plan.west) / (plan.east - plan.west) * width,
                                      (plan.north - lat) / (plan.north - plan.south) * height))
            else:
                outside.append(name)
        return Drawing(width, height, True, _labelled(markers, width), tuple(missing + outside),
                       *_scale_bar(units, width))
    return _plain(located, tuple(missing))


def _plain(located: list[tuple[str, str, float, float]], missing: tuple[str, ...]) -> Drawing:
    if not located:
        return Drawing(WIDTH, PLAIN_HEIGHT, False, (), missing, 0, 0.0)
    lat0 = sum(p[2] for p in located) / len(located)
    lon0 = sum(p[3] for p in located) / len(located)
    shrink = math.cos(math.radians(lat0))
    # Metres east and north of the centroid.
    points = [((lon - lon0) * shrink * METRES_PER_DEGREE, (lat - lat0) * METRES_PER_DEGREE)
              for _, _, lat, lon in located]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    span_x, span_y = max(xs) - min(xs), max(ys) - min(ys)
    room_x, room_y = WIDTH - 2 * MARGIN, PLAIN_HEIGHT - 2 * MARGIN
    # Units per metre: the same both ways (the plan is to scale); a lone post (or one spot) sits in the middle.
    scale = min(room_x / span_x if span_x else math.inf, room_y / span_y if span_y else math.inf)
    if math.isinf(scale):
        scale = room_x / 200  # 200 m across: a plan of one place still has a scale
    mid_x, mid_y = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    markers = [Marker(post_id, name, WIDTH / 2 + (x - mid_x) * scale, PLAIN_HEIGHT / 2 - (y - mid_y) * scale)
               for (post_id, name, _, _), (x, y) in zip(located, points, strict=True)]
    return Drawing(WIDTH, PLAIN_HEIGHT, False, _labelled(markers, WIDTH), missing, *_scale_bar(scale, WIDTH))


def _labelled(markers: list[Marker], width: float) -> tuple[Marker, ...]:
    """Each name above its marker, or below it where it would cover a name or a marker already placed (two
    posts a street apart stand close together on a plan to scale)."""
    placed: list[tuple[float, float, float, float]] = []  # left, top, right, bottom of each name
    out = []
    for m in sorted(markers, key=lambda m: (m.y, m.x)):
        half = len(m.name) * CHAR_WIDTH / 2
        dx = max(half - m.x, 0.0) - max(m.x + half - width, 0.0)
        x = m.x + dx
        for dy in (LABEL_ABOVE, LABEL_BELOW):
            box = (x - half, m.y + dy - LABEL_HEIGHT + 4, x + half, m.y + dy + 4)
            clash = any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed)
            clash = clash or any(box[0] < o.x + DOT and o.x - DOT < box[2] and box[1] < o.y + DOT and o.y - DOT < box[3]
                                 for o in markers if o is not m)
            if not clash:
                break
        else:
            dy = LABEL_ABOVE
            box = (x - half, m.y + dy - LABEL_HEIGHT + 4, x + half, m.y + dy + 4)
        placed.append(box)
        out.append(replace(m, label_dy=dy, label_dx=dx))
    return tuple(out)


def _scale_bar(units_per_metre: float, width: float) -> tuple[int, float]:
    """The largest round distance (1, 2 or 5 times a power of ten metres) drawn at most a fifth as wide as
    the plan."""
    most = width / 5 / units_per_metre
    power = 10 ** math.floor(math.log10(most))
    metres = max(step * power for step in (1, 2, 5) if step * power <= most)
    return int(metres) if metres >= 1 else 1, max(metres, 1) * units_per_metre


def state_of(post: Mapping[str, Any]) -> str:
    """A post's colour on the plan, from its view (``ReadModel.posts``): the first of STATES that holds.
    static/dashboard.js repeats this rule for live updates: keep the two in step."""
    call = post.get("call")
    if post.get("online") is False:
        return "offline"
    if call:
        return "answered" if call.get("state") == "answered" else "calling"
    if has_fault(post):
        return "fault"
    return "unknown" if post.get("online") is None else "idle"


def has_fault(post: Mapping[str, Any]) -> bool:
    """A fault to show beside the state (a camera fault on a calling post must not hide behind its colour)."""
    camera, test = post.get("camera"), post.get("last_self_test")
    return bool((camera and camera.get("ok") is False) or post.get("faults") or (test and test.get("passed") is False))
