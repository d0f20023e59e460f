"""``sip-refuge config check`` and ``sip-refuge secrets init``."""

from __future__ import annotations

import argparse
import sys

from sip_refuge.config.loader import load_site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.errors import Problem


def warning_text(problem: Problem) -> str:
    return f"{problem.file}:{problem.line}: {problem.path}: warning: {problem.message}"


def check(args: argparse.Namespace) -> int:
    site = load_site(args.site)
    for warning in site.warnings:
        print(warning_text(warning), file=sys.stderr)
    print(f"{args.site}: ok: {len(site.posts)} posts, {len(site.desks)} desks, queue {site.queue.name} "
          f"on {site.queue.extension}, {len(site.cctv)} CCTV targets")
    return 0


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
