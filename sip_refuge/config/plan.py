"""``site.plan``: the picture the dashboard draws the posts on, and the latitudes and longitudes of its edges.

    site:
      plan:
        image: plan.png                          # PNG, JPEG, GIF or WebP, north up; relative to the site file
        bounds: [[53.095, -1.270], [53.130, -1.240]]   # [[south, west], [north, east]] of the picture's edges

The picture is read (and checked) only where the sidecar's files are: a post agent never needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sip_refuge.config.files import read_image
from sip_refuge.config.model import Plan, Post
from sip_refuge.config.reader import Reader
from sip_refuge.errors import Problem, RefugeError

PLAN_IMAGE_MAX = 16 * 1024 * 1024  # bytes: a detailed site plan as PNG is a few MB
BOUNDS_HINT = "must be [[south, west], [north, east]] in degrees, for example [[53.095, -1.270], [53.130, -1.240]]"


def read_plan(r: Reader, *, check_file: bool) -> Plan | None:
    """``site.plan`` from its reader; ``check_file``: the picture must be there and be a picture."""
    image = r.path_value("image", required=True)
    bounds = _bounds(r)
    r.done()
    if image is not None and check_file:
        try:
            read_image(image, limit=PLAN_IMAGE_MAX, what="the site plan")
        except RefugeError as exc:
            r.fail("image", str(exc))
            return None
    if image is None or bounds is None:
        return None
    (south, west), (north, east) = bounds
    return Plan(image, south, west, north, east)


def _bounds(r: Reader) -> tuple[tuple[float, float], tuple[float, float]] | None:
    value = r.raw("bounds", True)
    if value is None:
        return None
    corners = _pairs(value)
    if corners is None:
        r.fail("bounds", BOUNDS_HINT)
        return None
    (south, west), (north, east) = corners
    problems = [(f"bounds[{i}][0]", lat, "a latitude is -90 to 90") for i, (lat, _) in enumerate(corners)
                if not -90 <= lat <= 90]
    problems += [(f"bounds[{i}][1]", lon, "a longitude is -180 to 180") for i, (_, lon) in enumerate(corners)
                 if not -180 <= lon <= 180]
    for key, number, why in problems:
        r.fail(key, f"{number} is out of range: {why}")
    if problems:
        return None
    if south >= north:
        r.fail("bounds", f"the south edge ({south}) must be below the north edge ({north}): {BOUNDS_HINT}")
        return None
    if west >= east:
        r.fail("bounds", f"the west edge ({west}) must be left of the east edge ({east}): {BOUNDS_HINT} "
                         "(a plan across the 180th meridian is not supported)")
        return None
    return corners


def _pairs(value: Any) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Two pairs of numbers (not true/false), or None."""
    if not isinstance(value, list) or len(value) != 2:
        return None
    out = []
    for pair in value:
        if not isinstance(pair, list) or len(pair) != 2 or \
                any(isinstance(v, bool) or not isinstance(v, int | float) for v in pair):
            return None
        out.append((float(pair[0]), float(pair[1])))
    return out[0], out[1]


def off_plan(plan: Plan, posts: Sequence[Post], problem: Any) -> list[Problem]:
    """Warnings for posts the plan cannot show: no lat/lon, or outside its bounds. ``problem(path, message)``
    locates each (the loader's Source.problem)."""
    out: list[Problem] = []
    for i, post in enumerate(posts):
        lat, lon = post.location.lat, post.location.lon
        if lat is None or lon is None:
            out.append(problem(f"posts[{i}].location", f"post {post.id} has no lat and lon, so the site "
                                                       "plan cannot show it"))
        elif not (plan.south <= lat <= plan.north and plan.west <= lon <= plan.east):
            out.append(problem(f"posts[{i}].location", f"post {post.id} ({lat}, {lon}) is outside "
                                                       "site.plan.bounds, so the site plan cannot show it"))
    return out
