"""``sip-refuge config check`` and ``sip-refuge secrets init``."""

from __future__ import annotations

import argparse

from sip_refuge.config.loader import load_site
from sip_refuge.config.secrets import init_secrets, purpose


def check(args: argparse.Namespace) -> int:
    if getattr(args, "post", None):
        # Imported here: the post's checks look at the post's packages, which a control room may not have.
        from sip_refuge.post.preflight import check_post, summary

        site, post, notes = check_post(args.site, args.post)
        print(f"{args.site}: {summary(site, post)}")
        for note in notes:
            print(f"{args.site}: note: {note}")
        return 0
    site = load_site(args.site)
    print(f"{args.site}: ok: {len(site.posts)} posts, {len(site.desks)} desks, queue {site.queue.name} "
          f"on {site.queue.extension}, {len(site.cctv)} CCTV targets")
    return 0


def secrets_init(args: argparse.Namespace) -> int:
    site = load_site(args.site, check_secrets=False)
    created = init_secrets(site)
    names = {secret.file: name for name, secret in site.secrets() if secret.file is not None}
    for path in created:
        print(f"created {path}: {purpose(site, names[path])}")
    if not created:
        print("every secret file exists already")
    # Validate the result, so weak or unreadable existing secrets are reported now.
    load_site(args.site)
    return 0
