"""``sip-refuge config check`` and ``sip-refuge secrets init``."""

from __future__ import annotations

import argparse
import sys

from sip_refuge.config.loader import load_site
from sip_refuge.config.model import Site
from sip_refuge.config.secrets import init_secrets


def check(args: argparse.Namespace) -> int:
    site = load_site(args.site)
    print(f"{args.site}: ok: {len(site.posts)} posts, {len(site.desks)} desks, queue {site.queue.name} "
          f"on {site.queue.extension}, {len(site.cctv)} CCTV targets")
    for warning in warnings(site):
        print(f"{args.site}: warning: {warning}", file=sys.stderr)
    return 0


def warnings(site: Site) -> list[str]:
    """What would work, but not well: today, a post that cannot cancel echo (the desk hears itself back)."""
    from sip_refuge.post import aec  # a ctypes look-up only: no post dependency is needed to check a site

    if aec.available() or not site.posts:
        return []
    backends = sorted({p.sip_backend for p in site.posts})
    return [f"posts: {aec.LIBRARY} (Debian package libspeexdsp1) is not installed on this machine, and both SIP "
            f"backends ({', '.join(backends)} here) cancel echo with it: a post run here would send the "
            "operator's own voice back to the desk. Install libspeexdsp1 on every post."]


def secrets_init(args: argparse.Namespace) -> int:
    site = load_site(args.site, check_secrets=False)
    created = init_secrets(site)
    for path in created:
        print(f"created {path}")
    if not created:
        print("every secret file exists already")
    # Validate the result, so weak or unreadable existing secrets are reported now.
    load_site(args.site)
    return 0
