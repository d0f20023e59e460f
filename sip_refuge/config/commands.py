"""``sip-refuge config check`` and ``sip-refuge secrets init``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sip_refuge.config.loader import load_site
from sip_refuge.config.model import Site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.config.source import load_yaml
from sip_refuge.errors import ConfigError, Problem


def warning_text(problem: Problem) -> str:
    return f"{problem.file}:{problem.line}: {problem.path}: warning: {problem.message}"


def check(args: argparse.Namespace) -> int:
    site = load_site(args.site)
    for warning in site.warnings:
        print(warning_text(warning), file=sys.stderr)
    if getattr(args, "post", None) is None:  # a post holds only the CA's certificate, not the PBX's files
        report_tls(site, Path(args.site))
    print(f"{args.site}: ok: {len(site.posts)} posts, {len(site.desks)} desks, queue {site.queue.name} "
          f"on {site.queue.extension}, {len(site.cctv)} CCTV targets")
    return 0


def secrets_init(args: argparse.Namespace) -> int:
    site = load_site(args.site, check_secrets=False)
    created = [(path, "") for path in init_secrets(site)]
    if site.pbx.tls is not None:
        from sip_refuge.config.certs import init_tls

        created += init_tls(site, renew=args.renew_pbx_cert)
    for path, what in created:
        print(f"created {path}" + (f" ({what})" if what else ""))
    if not created:
        print("every secret file exists already")
    # Validate the result, so weak or unreadable existing secrets (and certificates) are reported now.
    report_tls(load_site(args.site), Path(args.site))
    return 0


def report_tls(site: Site, path: Path) -> None:
    """The PBX certificate's problems, located in the site file: errors raise, warnings go to stderr."""
    if site.pbx.tls is None:
        return
    from sip_refuge.config.cert_check import check_tls

    findings = check_tls(site)
    if not findings:
        return
    src = load_yaml(path)
    errors: list[Problem] = []
    for finding in findings:
        if finding.warning:
            print(src.problem(finding.key, f"warning: {finding.message}"), file=sys.stderr)
        else:
            errors.append(src.problem(finding.key, finding.message))
    if errors:
        raise ConfigError(errors)
