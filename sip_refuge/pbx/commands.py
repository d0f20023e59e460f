"""``sip-refuge asterisk render``, ``sip-refuge asterisk check`` and ``sip-refuge pbx``."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from sip_refuge.config.loader import load_site
from sip_refuge.config.model import PRIMARY, SECONDARY, Site
from sip_refuge.config.secrets import stand_in_secrets
from sip_refuge.errors import PbxError
from sip_refuge.pbx.asterisk import Asterisk, lock_workdir, on_free_ports, site_workdir
from sip_refuge.pbx.lint import lint

TEMPLATES_ENV = "SIP_REFUGE_TEMPLATES"
# "[Nov 26 11:34:16] WARNING[10000]: ccss.c:4520 load_config: text" (console) or
# "[Nov 26 11:34:16] WARNING[10000] ccss.c: text" (messages.log); the [C-...] call id is optional.
_LOG_LINE = re.compile(r"^\[[^\]]+\]\s+(?P<level>ERROR|WARNING)\[\d+\](?:\[[^\]]*\])?:?\s+(?P<source>[\w./-]+?)"
                       r"(?::\d+)?(?:\s+\w+)?:\s+(?P<text>.*)$")
_ENDPOINT = re.compile(r"^\s*Endpoint:\s+(?P<name>[^\s/]+)")
_CONTEXT_OPTION = re.compile(r"^\s*context\s*:\s*(?P<name>\S+)", re.M)
_DIALPLAN_CONTEXT = re.compile(r"^\[ Context '(?P<name>[^']+)' created by", re.M)
_SECTION = re.compile(r"^\[(?P<name>[^\]]+)\](?!\s*\(!)", re.M)


def templates_dir(args: argparse.Namespace) -> Path | None:
    """``--templates DIR`` if the command line has it, else $SIP_REFUGE_TEMPLATES, else the shipped ones."""
    given = getattr(args, "templates", None) or os.environ.get(TEMPLATES_ENV)
    return Path(given) if given else None


def _command_line(words: str, args: argparse.Namespace) -> str:
    # Named in each generated file's header so an admin knows how it was made.
    return f"sip-refuge {words} {args.site}"


def role_of(args: argparse.Namespace) -> str:
    """``--role``: which PBX of the site's pair (primary unless the command line says secondary)."""
    role: str = getattr(args, "role", None) or PRIMARY
    return role


def _role_words(args: argparse.Namespace) -> str:
    return " --role secondary" if role_of(args) == SECONDARY else ""


def render(args: argparse.Namespace) -> int:
    from sip_refuge.pbx import render as renderer

    site = load_site(args.site)
    out = Path(args.out)
    command = _command_line("asterisk render", args) + f" --out {args.out}" + (" --sandbox" if args.sandbox else "") \
        + _role_words(args)
    templates = templates_dir(args)
    role = role_of(args)
    if getattr(args, "sandbox", False):
        # The sandbox set names absolute directories: config here, modules and sounds of the found Asterisk.
        from sip_refuge.pbx.asterisk import find_asterisk

        install = find_asterisk()
        base = out.resolve()
        dirs = renderer.SandboxDirs(etc=base, modules=install.modules, data=install.data, run=base / "run",
                                    log=base / "log", spool=base / "spool", lib=base / "lib", db=base / "db",
                                    keys=base / "keys")
        for path in (dirs.run, dirs.log, dirs.spool, dirs.lib, dirs.db, dirs.keys):
            path.mkdir(parents=True, exist_ok=True)
        files = renderer.render_sandbox(site, dirs, command=command, templates=templates, role=role)
    else:
        files = renderer.render(site, command=command, templates=templates, role=role)
    for path in renderer.write(files, out):
        print(path)
    return 0


def check(args: argparse.Namespace) -> int:
    """Load the rendered site into a real Asterisk on loopback; print one line per problem; 0 when clean."""
    site = load_site(args.site, check_secrets=False)
    with tempfile.TemporaryDirectory(prefix="sip-refuge-check-") as spare:
        site, stood_in = stand_in_secrets(site, Path(spare))
        if stood_in:
            # The throw-away Asterisk needs some secret; real ones are checked by `config check`.
            print(f"asterisk check: no secret yet for {', '.join(stood_in)}: checking with throw-away values "
                  "(run `sip-refuge secrets init` before rendering for real)", file=sys.stderr)
        if site.pbx.tls is not None:
            from sip_refuge.config.certs import stand_in_tls

            site, tls_stood_in = stand_in_tls(site, Path(spare))
            if tls_stood_in:
                print("asterisk check: no PBX certificate yet: checking with a throw-away one (run `sip-refuge "
                      "secrets init` before rendering for real)", file=sys.stderr)
        return _check_loaded(args, site)


def _check_loaded(args: argparse.Namespace, site: Site) -> int:
    try:
        with Asterisk(on_free_ports(site), command=_command_line("asterisk check", args) + _role_words(args),
                      templates=templates_dir(args), role=role_of(args)) as pbx:
            problems = inspect(pbx, site)
    except PbxError as exc:
        # Asterisk would not even boot: what it logged is the best description of the problem.
        print(f"asterisk check: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(problem)
    if problems:
        print(f"{args.site}: {len(problems)} problem(s) in the rendered Asterisk config", file=sys.stderr)
        return 1
    print(f"{args.site}: ok: Asterisk ({role_of(args)}) loaded {len(site.posts)} posts, {len(site.desks)} desks, "
          f"queue {site.queue.name} and the dialplan without an error or warning")
    return 0


def inspect(pbx: Asterisk, site: Site) -> list[str]:
    """Every problem a running sandbox shows with the site's config: log lines, missing objects, lint."""
    problems: list[str] = []
    endpoints = {m["name"] for line in pbx.cli("pjsip show endpoints").splitlines() if (m := _ENDPOINT.match(line))}
    phones = [("post", p.id) for p in site.posts] + [("desk", d.id) for d in site.desks]
    endpoint_contexts: dict[str, str] = {}
    for role, name in phones:
        if name not in endpoints:
            problems.append(f"pjsip: {role} {name} is missing from `pjsip show endpoints`")
            continue
        if m := _CONTEXT_OPTION.search(pbx.cli(f"pjsip show endpoint {name}")):
            endpoint_contexts[name] = m["name"]
    queue = pbx.cli(f"queue show {site.queue.name}")
    if "No such queue" in queue or not queue.strip():
        problems.append(f"queue: queue {site.queue.name} is missing from `queue show`")
    dialplan = pbx.cli("dialplan show")
    loaded = set(_DIALPLAN_CONTEXT.findall(dialplan))
    ours = [m["name"] for m in _SECTION.finditer(pbx.files.get("extensions_refuge.conf", ""))]
    for name in ours:
        if name not in loaded:
            problems.append(f"dialplan: context {name} (extensions_refuge.conf) is missing from `dialplan show`")
    for phone, context in endpoint_contexts.items():
        if context not in loaded:
            problems.append(f"pjsip: endpoint {phone} uses context {context}, which is missing from `dialplan show`")
    problems += lint(dialplan, pbx.cli("core show applications"), pbx.cli("core show functions"),
                     contexts=[n for n in dict.fromkeys(ours) if n in loaded])
    # Logs last: the commands above can make Asterisk warn, too.
    return log_problems(pbx) + problems


def log_problems(pbx: Asterisk) -> list[str]:
    """Each ERROR or WARNING Asterisk logged (console output and messages.log), once."""
    seen: dict[tuple[str, str], str] = {}
    texts = [pbx.output()]
    if pbx.messages_log.exists():
        texts.append(pbx.messages_log.read_text(encoding="utf-8", errors="replace"))
    for text in texts:
        for line in text.splitlines():
            if m := _LOG_LINE.match(line.strip()):
                source = m["source"].rsplit(":", 1)[0]
                # The sandbox's temporary path means nothing to the reader; the file name does.
                message = m["text"].strip().replace(f"{pbx.dir}/etc/", "")
                seen.setdefault((m["level"], message), f"asterisk {m['level']}: {source}: {message}")
    return list(seen.values())


def run(args: argparse.Namespace) -> int:
    """Run Asterisk with the site until Ctrl-C (or SIGTERM); its console output goes to our stdout."""
    site = load_site(args.site)
    role = role_of(args)
    if role not in site.pbx.roles:
        raise PbxError(f"{site.path}: pbx.secondary_host is not set: the site has no secondary PBX to run "
                       "(on loopback set it to another address, such as 127.0.0.2)")
    # A fixed work dir per site file and role, so the logs are still there to read after Ctrl-C; held by a
    # lock, so a second `sip-refuge pbx` of the same site and role cannot render over it or use its control
    # socket, while the other PBX of the pair runs beside it.
    workdir = site_workdir(site.path, role)
    with lock_workdir(workdir):
        pbx = Asterisk(site, command=_command_line("pbx", args) + _role_words(args), templates=templates_dir(args),
                       console=True, workdir=workdir, role=role)
        return _run_until_stopped(pbx, site, args)


def _run_until_stopped(pbx: Asterisk, site: Site, args: argparse.Namespace) -> int:
    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        pbx.start()
        role = pbx.role
        ami = site.pbx.ami_of(role)
        print(f"Asterisk running (pid {pbx.pid}) for {args.site}{'' if role == PRIMARY else ' as the ' + role}: "
              f"SIP on {site.pbx.bind_of(role)}:{site.pbx.sip_port}, AMI on {ami.host}:{ami.port}", flush=True)
        print(f"  config and logs: {pbx.dir}  (messages: {pbx.messages_log}, security: {pbx.security_log})")
        print(f"  attach its CLI:  {pbx.attach_command()}")
        print("  Ctrl-C stops it.", flush=True)
        status = pbx.wait()
        print(f"Asterisk exited with status {status}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping Asterisk...", file=sys.stderr, flush=True)
        return 0
    finally:
        pbx.close()
        signal.signal(signal.SIGTERM, previous)
