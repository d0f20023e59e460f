"""The ``sip-refuge`` command line (spec section 3).

Each command imports its own part lazily, so ``config check`` works on a machine without pjsua2,
opencv or Asterisk. A user's mistake ends in a clear message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path

from sip_refuge.errors import ConfigError, RefugeError
from sip_refuge.logs import setup_logging

# command -> (module, function, help). The function takes the parsed arguments and returns an exit status.
COMMANDS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("config", "check"): ("sip_refuge.config.commands", "check", "validate a site file"),
    ("secrets", "init"): ("sip_refuge.config.commands", "secrets_init", "create missing secret files"),
    ("users", "add"): ("sip_refuge.config.commands", "users_add",
                       "add an operator to the sidecar's users file, or set a new password (asked, never an argument)"),
    ("users", "remove"): ("sip_refuge.config.commands", "users_remove", "remove an operator (their sessions end)"),
    ("asterisk", "render"): ("sip_refuge.pbx.commands", "render", "write the Asterisk include files"),
    ("asterisk", "check"): ("sip_refuge.pbx.commands", "check", "load the rendered config into a real Asterisk"),
    ("pbx",): ("sip_refuge.pbx.commands", "run", "run a real Asterisk on loopback with the rendered site"),
    ("sidecar",): ("sip_refuge.sidecar.runner", "run", "run the sidecar (AMI, CCTV events, dashboard, API)"),
    ("post",): ("sip_refuge.post.agent", "run", "run one post agent"),
    ("press",): ("sip_refuge.post.agent", "press", "press the button of a running mock-GPIO post agent"),
    ("status",): ("sip_refuge.post.agent", "status", "print a running post agent's state as JSON"),
    ("demo",): ("sip_refuge.demo.run", "run", "everything on loopback in one command (Ctrl-C stops it)"),
}
ARGUMENTS: dict[tuple[str, ...], Callable[[argparse.ArgumentParser], None]] = {}

# The packages a part brings with its extra (setup.cfg), by the name Python imports them as: a command
# that meets one missing says which extra installs it instead of showing a traceback.
EXTRAS: dict[str, tuple[str, str]] = {
    "flask": ("Flask", "sidecar"), "werkzeug": ("Flask", "sidecar"), "h11": ("h11", "sidecar"),
    "panoramisk": ("panoramisk", "sidecar"), "standardwebhooks": ("standardwebhooks", "sidecar"),
    "requests": ("requests", "sidecar"), "prometheus_client": ("prometheus_client", "sidecar"), "cv2": ("opencv-python-headless", "sidecar"),
    "numpy": ("opencv-python-headless", "sidecar"), "gpiozero": ("gpiozero", "post"), "pyVoIP": ("pyVoIP", "post"),
}


def _site(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("site", metavar="SITE", help="the site file (YAML)")


def _templates(parser: argparse.ArgumentParser) -> None:
    _site(parser)
    # The path of the shipped templates, so an admin of an installed package finds them to copy and adapt.
    shipped = Path(__file__).resolve().parent / "pbx" / "templates"
    parser.add_argument("--templates", metavar="DIR",
                        help=f"render from this template directory (default: $SIP_REFUGE_TEMPLATES, else the "
                             f"shipped templates in {shipped.resolve()})")


def _check_args(parser: argparse.ArgumentParser) -> None:
    _site(parser)
    parser.add_argument("--post", metavar="ID",
                        help="on a post: check only what post ID needs (its own secret, SIP backend, GPIO, PBX name)")


def _render_args(parser: argparse.ArgumentParser) -> None:
    _templates(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write the files into")
    parser.add_argument("--sandbox", action="store_true",
                        help="also write asterisk.conf, modules.conf and friends for a loopback run")


def _sidecar_args(parser: argparse.ArgumentParser) -> None:
    _site(parser)
    parser.add_argument("--no-cameras", action="store_true", help="do not probe cameras (no opencv needed)")


def _post_id(parser: argparse.ArgumentParser) -> None:
    _site(parser)
    parser.add_argument("--post", required=True, metavar="ID", help="the post's id in the site file")


def _post_args(parser: argparse.ArgumentParser) -> None:
    _post_id(parser)
    parser.add_argument("--gpio", choices=("real", "mock"), default="real",
                        help="mock: gpiozero's MockFactory and `sip-refuge press` (demo, tests)")
    parser.add_argument("--audio", metavar="DEVICE",
                        help="the sound card (ALSA device) for calls, prompts and the self-test, or 'null' "
                             "(default: null with mock GPIO, else 'default')")
    parser.add_argument("--audio-in", metavar="IN.WAV",
                        help="mock sound card: the microphone hears IN.WAV (16-bit PCM mono, 8/16/48 kHz), looped, "
                             "plus the post's own speaker; needs --audio-out")
    parser.add_argument("--audio-out", metavar="OUT.WAV",
                        help="mock sound card: everything the speaker plays (prompts, the far end's voice, the "
                             "self-test's chirp) is written to OUT.WAV as it plays; needs --audio-in")
    parser.add_argument("--state-dir", metavar="DIR", help="where the telemetry outbox is kept")


def _secrets_args(parser: argparse.ArgumentParser) -> None:
    _site(parser)
    parser.add_argument("--renew-pbx-cert", action="store_true",
                        help="issue the PBX a new TLS key and certificate from the site CA, replacing the old ones")


ARGUMENTS[("secrets", "init")] = _secrets_args


def _user_args(parser: argparse.ArgumentParser) -> None:
    _site(parser)
    parser.add_argument("name", metavar="NAME", help="the operator's login name")


def _user_add_args(parser: argparse.ArgumentParser) -> None:
    _user_args(parser)
    parser.add_argument("--role", choices=("operator", "admin"), default="operator",
                        help="admin may also read the audit log (default: operator)")


ARGUMENTS[("users", "add")] = _user_add_args
ARGUMENTS[("users", "remove")] = _user_args


ARGUMENTS[("config", "check")] = _check_args
ARGUMENTS[("asterisk", "render")] = _render_args
ARGUMENTS[("asterisk", "check")] = _templates
ARGUMENTS[("pbx",)] = _templates
def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--site", metavar="SITE", help="the demo site file (default: config/demo.yaml)")
    parser.add_argument("--log-dir", metavar="DIR", help="where the parts' logs go (default: var/demo)")


ARGUMENTS[("post",)] = _post_args
ARGUMENTS[("demo",)] = _demo_args
ARGUMENTS[("press",)] = _post_id
ARGUMENTS[("status",)] = _post_id
ARGUMENTS[("sidecar",)] = _sidecar_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sip-refuge", description="Street refuge points on SIP, Asterisk and the CCTV you already have.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for words, (module, func, help_text) in COMMANDS.items():
        if len(words) == 1:
            sub = top.add_parser(words[0], help=help_text)
        else:
            if words[0] not in groups:
                group = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            sub = groups[words[0]].add_parser(words[1], help=help_text)
        ARGUMENTS.get(words, _site)(sub)
        sub.set_defaults(target=(module, func))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    module, func = args.target
    try:
        command: Callable[[argparse.Namespace], int] = getattr(import_module(module), func)
        return command(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except RefugeError as exc:
        print(f"sip-refuge: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        missing = EXTRAS.get((exc.name or "").partition(".")[0])
        if missing is None:
            raise
        package, extra = missing
        what = " ".join(words for words in (args.command, getattr(args, "subcommand", None)) if words)
        hint = " (or run it with --no-cameras: no camera checks, no opencv)" if package.startswith("opencv") else ""
        print(f"sip-refuge {what}: needs {package}, which is not installed: pip install 'sip-refuge[{extra}]'{hint}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
