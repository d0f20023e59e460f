"""``sip-refuge config check``, ``sip-refuge secrets init`` and ``sip-refuge users add/remove``."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from sip_refuge.config.loader import load_site
from sip_refuge.config.model import Site
from sip_refuge.config.passwords import check_new_password, hash_password
from sip_refuge.config.secrets import init_secrets, purpose
from sip_refuge.config.source import load_yaml
from sip_refuge.config.users import check_name, read_users, remove_user, set_user
from sip_refuge.errors import ConfigError, Problem, RefugeError

USERS_FILE = ("the operators who may log in to the sidecar's pages, empty for now: add each with "
              "`sip-refuge users add SITE NAME`; stays in the control room")


def warning_text(problem: Problem) -> str:
    return f"{problem.file}:{problem.line}: {problem.path}: warning: {problem.message}"


def check(args: argparse.Namespace) -> int:
    if getattr(args, "post", None):
        # Imported here: the post's checks look at the post's packages, which a control room may not have.
        from sip_refuge.post.preflight import check_post, summary

        site, post, notes = check_post(args.site, args.post)
        print(f"{args.site}: {summary(site, post)}")
        for note in notes:
            print(f"{args.site}: note: {note}")
        for text in warnings(site):  # on the post itself this matters most: its own echo canceller
            print(f"{args.site}: warning: {text}", file=sys.stderr)
        return 0
    site = load_site(args.site)
    for warning in site.warnings:
        print(warning_text(warning), file=sys.stderr)
    report_tls(site, Path(args.site))  # not on a post (above): it holds only the CA's certificate
    users = site.sidecar.users_file if site.sidecar is not None else None
    operators = f", {len(read_users(users))} operators" if users is not None else ", no users_file"
    print(f"{args.site}: ok: {len(site.posts)} posts, {len(site.desks)} desks, queue {site.queue.name} "
          f"on {site.queue.extension}, {len(site.cctv)} CCTV targets{operators if site.sidecar else ''}")
    for text in warnings(site):
        print(f"{args.site}: warning: {text}", file=sys.stderr)
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
    names = {secret.file: name for name, secret in site.secrets() if secret.file is not None}
    created = [(path, purpose(site, names[path]) if path in names else USERS_FILE) for path in init_secrets(site)]
    if site.pbx.tls is not None:
        from sip_refuge.config.certs import init_tls

        created += init_tls(site, renew=args.renew_pbx_cert)
    for path, what in created:
        print(f"created {path}" + (f": {what}" if what else ""))
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


def _users_file(site_path: str) -> Path:
    site = load_site(site_path, check_secrets=False)
    if site.sidecar is None or site.sidecar.users_file is None:
        raise RefugeError(f"{site_path}: the site names no users file: add `users_file: secrets/sidecar.users` "
                          "under `sidecar:`")
    return site.sidecar.users_file


def _new_password(name: str) -> str:
    """From the terminal, typed twice and never echoed; otherwise the first line of stdin (scripts)."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"New password for {name}: ")
        check_new_password(first)
        if getpass.getpass("The same again: ") != first:
            raise RefugeError("the two passwords differ; nothing was changed")
        return first
    line = sys.stdin.readline()
    if not line:
        raise RefugeError("no password on stdin (give it as the first line, or run this in a terminal)")
    password = line.removesuffix("\n").removesuffix("\r")
    check_new_password(password)
    return password


def users_add(args: argparse.Namespace) -> int:
    """Add an operator, or set a new password (and role) for one; the password never goes on the command line."""
    path = _users_file(args.site)
    name = check_name(args.name)
    password = _new_password(name)
    created = set_user(path, name, args.role, hash_password(password))
    print(f"{'added' if created else 'updated'} {args.role} {name} in {path}")
    return 0


def users_remove(args: argparse.Namespace) -> int:
    path = _users_file(args.site)
    if not remove_user(path, args.name):
        raise RefugeError(f"{path}: no user {args.name!r}")
    print(f"removed {args.name} from {path}; a running sidecar logs out their sessions")
    return 0
