"""Hostile site files and secrets (issue 8, findings 12 and 14): each is refused with a located message and
exit status 2, never a traceback, a hang, or a value written into a generated file."""

from __future__ import annotations

import importlib
import os
import resource
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sip_refuge.config import load_site
from sip_refuge.config.cctv.webhook import WebhookOptions
from sip_refuge.config.files import MAX_SECRET_BYTES, MAX_SITE_BYTES
from sip_refuge.config.secrets import init_secrets
from sip_refuge.config.source import MAX_DEPTH
from sip_refuge.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "site.example.yaml"
TLS = REPO / "tests" / "golden" / "tls-site.yaml"
# Every optional key that takes text, on top of what the TLS golden site already has.
EXTRA = """
prompts_dir: prompts
sidecar:
  listen: 127.0.0.1:8080
  token_file: secrets/sidecar.token
  database: var/db.sqlite3
  public_url: https://refuge.example/
cctv:
  - type: webhook
    name: hook
    url: https://vms.example/hook
    secret_file: secrets/webhook.secret
    headers: {X-Site: ashfield}
    body_template: '{"post": {{ post.id | tojson }}}'
  - {type: milestone, name: xprotect, host: 10.0.0.9, template: "{type} {post_id}"}
  - type: nx
    name: nx
    url: https://nx.example:7001
    username: refuge
    password_file: secrets/nx.secret
    verify: tls/nx-ca.crt
    cameras: {park-gate: "7a1b"}
  - {type: vlc, name: wall, url: "http://127.0.0.1:8081", password_file: secrets/vlc.secret}
"""
INJECTED = "\n[evil-desk](refuge-desk)\nauth=evil-auth"


def run_cli(*args: str, limit_memory: bool = False) -> subprocess.CompletedProcess[str]:
    def cap() -> None:
        # "Cheaply": a billion laughs or a huge file must be refused well inside this much memory.
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    # The timeout only turns a hang (a FIFO read) into a failure instead of a stuck run.
    return subprocess.run([sys.executable, "-m", "sip_refuge.cli", *args], capture_output=True, text=True,
                          check=False, timeout=120, preexec_fn=cap if limit_memory else None)


def assert_refused(result: subprocess.CompletedProcess[str], prefix: str, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith(prefix) and all(n in line for n in needles) for line in lines), (prefix, needles,
                                                                                                   lines)


@pytest.fixture()
def full_site(tmp_path: Path) -> Path:
    """The TLS golden site plus every optional text key, with its secrets and prompts folder."""
    path = tmp_path / "site.yaml"
    path.write_text(TLS.read_text(encoding="utf-8") + EXTRA, encoding="utf-8")
    (tmp_path / "prompts").mkdir()
    init_secrets(load_site(path, check_secrets=False))
    load_site(path)  # the base is clean: every problem below comes from the one hostile value
    return path


def text_scalars(text: str) -> Iterator[tuple[str, yaml.ScalarNode]]:
    """(dotted path, node) of every text value in a YAML document, found by PyYAML's own composer."""
    def walk(node: yaml.Node, path: str) -> Iterator[tuple[str, yaml.ScalarNode]]:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                yield from walk(value, f"{path}.{key.value}" if path else str(key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                yield from walk(item, f"{path}[{i}]")
        elif isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            yield path, node

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    assert root is not None
    yield from walk(root, "")


FULL_TEXT = TLS.read_text(encoding="utf-8") + EXTRA
SCALARS = [path for path, _ in text_scalars(FULL_TEXT)]


def test_the_base_covers_paths_names_urls_and_every_section() -> None:
    for key in ("site.name", "pbx.tls.cert_file", "pbx.tls.key_file", "pbx.tls.ca_file", "pbx.host",
                "desks[0].secret_file", "posts[0].location.address", "prompts_dir", "sidecar.database",
                "cctv[0].headers.X-Site", "cctv[2].verify", "cctv[2].cameras.park-gate", "pbx.networks.posts[1]"):
        assert key in SCALARS, key


@pytest.mark.parametrize("key", SCALARS)
def test_a_line_break_in_any_text_value_is_refused_at_its_line(full_site: Path, key: str) -> None:
    """Finding 12: a newline in pbx.tls.cert_file injected PJSIP config; now every text value is checked."""
    text = full_site.read_text(encoding="utf-8")
    node = dict(text_scalars(text))[key]
    # body_template is the one value that may span lines (a JSON body); an escape character still may not.
    value = node.value + ("\x1b[2J" if key.endswith("body_template") else INJECTED)
    hostile = text[:node.start_mark.index] + yaml.safe_dump(value, default_style='"', width=10_000).strip() + \
        text[node.end_mark.index:]
    full_site.write_text(hostile, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_site(full_site)
    located = f"{full_site}:{node.start_mark.line + 1}: {key}: "
    assert any(str(p).startswith(located) for p in info.value.problems), [str(p) for p in info.value.problems]


def test_config_check_names_the_control_character(full_site: Path) -> None:
    text = full_site.read_text(encoding="utf-8")
    full_site.write_text(text.replace("cert_file: tls/pbx.crt", 'cert_file: "tls/pbx.crt\\n[evil]"'))
    line = next(n for n, row in enumerate(full_site.read_text().splitlines(), 1) if "[evil]" in row)
    assert_refused(run_cli("config", "check", str(full_site)), f"{full_site}:{line}: pbx.tls.cert_file: ",
                   "control character (U+000A, a line break)")


def test_asterisk_check_refuses_it_before_starting_asterisk(full_site: Path) -> None:
    """Finding 12: `asterisk check` said ok to the injected hidden desk; it now stops at the site file."""
    text = full_site.read_text(encoding="utf-8")
    full_site.write_text(text.replace("cert_file: tls/pbx.crt", 'cert_file: "tls/pbx.crt\\n[evil](refuge-desk)"'))
    result = run_cli("asterisk", "check", str(full_site))
    assert_refused(result, f"{full_site}:", "pbx.tls.cert_file: holds a control character")
    assert "Asterisk loaded" not in result.stdout


@pytest.mark.parametrize("char", ["\r", "\x00", "\x85", "\u2028", "\u202e"])
def test_other_line_breaking_and_bidi_characters_are_refused(site_copy: Path, char: str) -> None:
    escaped = char.encode("unicode_escape").decode()
    text = site_copy.read_text().replace("name: Operator Desk 1", f'name: "Operator{escaped}Desk 1"')
    site_copy.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_site(site_copy)
    assert any("desks[0].name: holds a control character" in str(p) for p in info.value.problems)


def test_a_multi_line_body_template_is_still_accepted(full_site: Path) -> None:
    text = full_site.read_text().replace("""body_template: '{"post": {{ post.id | tojson }}}'""",
                                         """body_template: |\n      {"post": {{ post.id | tojson }},\n       "n": 1}""")
    full_site.write_text(text)
    site = load_site(full_site)
    options = site.cctv[0].options
    assert isinstance(options, WebhookOptions) and "\n" in str(options.body_template)


def test_semicolon_in_a_tls_path_is_refused(full_site: Path) -> None:
    text = full_site.read_text().replace("key_file: tls/pbx.key", "key_file: tls/pbx;x.key")
    full_site.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_site(full_site)
    assert any("pbx.tls.key_file" in str(p) and "comment" in str(p) for p in info.value.problems)


def test_a_key_with_a_control_character_is_refused(site_copy: Path) -> None:
    site_copy.write_text(site_copy.read_text() + '"x\\ny": 1\n')
    assert_refused(run_cli("config", "check", str(site_copy)), f"{site_copy}:", "a key holds a control character")


def test_a_line_break_in_the_site_files_own_path_is_refused_on_one_line(tmp_path: Path) -> None:
    """Finding 12: the site file's path goes into every header; a newline in it is refused, shown escaped."""
    folder = tmp_path / "evil\n[x]"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "site.yaml")
    result = run_cli("config", "check", str(folder / "site.yaml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()  # the escaped name keeps the message on one line
    assert line.startswith(f"{tmp_path}/evil\\n[x]/site.yaml:1: (file): the site file's path holds a control")


# -- YAML limits (finding 14) ------------------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def laughs() -> str:
    """The "billion laughs": 9 levels of 9 aliases each, 387 million values once expanded."""
    rows = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize(("name", "text", "line", "needle"), [
    ("deep", "site: " + "[" * 20000 + "]" * 20000 + "\n", 1, f"nested deeper than {MAX_DEPTH} levels"),
    ("deep-blocks", "".join("  " * i + f"k{i}:\n" for i in range(40)), MAX_DEPTH, "nested deeper"),
    ("laughs", laughs(), 6, "aliases expand to more than"),  # a0..a4 hold 75,000 values, a5 531,441
    ("alias-loop", "site: &a [*a]\n", 1, "aliases expand to more than"),
    ("huge-int", "site: {name: " + "9" * 5000 + "}\n", 1, "cannot read this value: Exceeds the limit"),
    ("bad-date", "site:\n  name: 2024-13-45\n", 2, "cannot read this value: month must be in 1..12"),
    ("python-tag", "site: !!python/object:os.system x\n", 1, "could not determine a constructor"),
    ("python-tag-on-a-list", "pbx: !!python/object/apply:os.system [true]\n", 1, "the tag tag:yaml.org,2002:python"),
    ("bad-base64", "site: !!binary 'zz'\n", 1, "cannot read this value: failed to decode base64"),
])
def test_hostile_yaml_is_refused_at_its_line(tmp_path: Path, name: str, text: str, line: int, needle: str) -> None:
    path = write(tmp_path / f"{name}.yaml", text)
    assert_refused(run_cli("config", "check", str(path), limit_memory=True), f"{path}:{line}: ", needle)


def test_a_site_file_over_the_size_cap_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with open(path, "wb") as out:
        out.write(b"# padding\n" * (MAX_SITE_BYTES // 10 + 1))
    assert_refused(run_cli("config", "check", str(path), limit_memory=True), f"{path}:1: (file): ", "larger than 1 MiB")


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_site_file_that_is_no_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    path = {"fifo": tmp_path / "site.yaml", "device": Path("/dev/zero"), "directory": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    expected = {"fifo": "is a named pipe (FIFO)", "device": "is a character device", "directory": "is a directory"}
    assert_refused(run_cli("config", "check", str(path), limit_memory=True), f"{path}:1: (file): ", expected[kind])


def test_limits_leave_aliases_that_share_a_block_alone(site_copy: Path) -> None:
    text = site_copy.read_text().replace("gpio: {button: 17, yellow: 22, green: 23, red: 24}\n    sip_backend: pyvoip",
                                         "gpio: &pins {button: 17, yellow: 22, green: 23, red: 24}\n"
                                         "    sip_backend: pyvoip")
    text = text.replace("gpio: {button: 17, yellow: 22, green: 23, red: 24}\n    sip_backend: pjsua2",
                        "gpio: *pins\n    sip_backend: pjsua2")
    assert "*pins" in text
    site_copy.write_text(text)
    assert load_site(site_copy).posts[2].gpio.button == 17


# -- secret files (finding 14) ---------------------------------------------------------------------

DESK1 = "secret_file: secrets/desk-1.secret"


def desk1(site: Path) -> Path:
    return site.parent / "secrets" / "desk-1.secret"


def desk1_line(site: Path) -> int:
    return next(n for n, row in enumerate(site.read_text().splitlines(), 1) if DESK1 in row)


def replace_secret(site: Path, make: str) -> Path:
    path = desk1(site)
    path.unlink()
    if make == "fifo":
        os.mkfifo(path, 0o600)
    elif make == "directory":
        path.mkdir(0o700)
    elif make == "shadow-link":
        # Stands in for /etc/shadow: a private file the site has no business reading.
        shadow = site.parent / "shadow"
        shadow.write_text("root:$6$notyours:19000:0:99999:7:::\n")
        shadow.chmod(0o600)
        path.symlink_to(shadow)
    elif make == "dangling-link":
        path.symlink_to(site.parent / "nowhere" / "desk-1.secret")
    return path


@pytest.mark.parametrize(("make", "needle"), [
    ("fifo", "is a named pipe (FIFO), not a regular file"),
    ("directory", "is a directory, not a regular file"),
    ("shadow-link", "is a symbolic link (to "),
    ("dangling-link", "is a symbolic link (to "),
])
def test_a_secret_that_is_no_regular_file_is_refused(site_copy: Path, make: str, needle: str) -> None:
    replace_secret(site_copy, make)
    result = run_cli("config", "check", str(site_copy))
    assert_refused(result, f"{site_copy}:{desk1_line(site_copy)}: desks[0].secret_file: ", needle)
    assert "run: sip-refuge secrets init" not in result.stderr  # the hint is for missing files only
    assert "notyours" not in result.stderr


def test_a_secret_pointing_at_a_device_is_refused(site_copy: Path) -> None:
    line = desk1_line(site_copy)
    site_copy.write_text(site_copy.read_text().replace(DESK1, "secret_file: /dev/zero"))
    assert_refused(run_cli("config", "check", str(site_copy), limit_memory=True),
                   f"{site_copy}:{line}: desks[0].secret_file: ", "/dev/zero is a character device")


@pytest.mark.parametrize(("content", "needle"), [
    (b"\xff\xfe\x00not-utf8-at-all-0123456789\n", "is not UTF-8 text"),
    (b"x" * (MAX_SECRET_BYTES + 1), f"is larger than {MAX_SECRET_BYTES} bytes"),
    (b"Zq8vN2xK4pL9mR7t\nauth=evil\n", "holds a control character (U+000A"),
])
def test_a_secret_that_is_not_one_short_line_of_text_is_refused(site_copy: Path, content: bytes,
                                                                 needle: str) -> None:
    desk1(site_copy).write_bytes(content)
    assert_refused(run_cli("config", "check", str(site_copy)),
                   f"{site_copy}:{desk1_line(site_copy)}: desks[0].secret_file: ", needle)


def test_a_secret_from_the_environment_is_checked_too(site_copy: Path) -> None:
    site_copy.write_text(site_copy.read_text().replace(DESK1, "secret_env: DESK1_SECRET"))
    env = {**os.environ, "DESK1_SECRET": "Zq8vN2xK4pL9mR7t\x1bW1yB"}
    result = subprocess.run([sys.executable, "-m", "sip_refuge.cli", "config", "check", str(site_copy)],
                            capture_output=True, text=True, check=False, timeout=60, env=env)
    assert_refused(result, f"{site_copy}:", "desks[0].secret_env", "control character (U+001B")


def test_secrets_init_never_writes_through_a_dangling_link(tmp_path: Path) -> None:
    """Finding 14: `secrets init` followed a dangling symlink and created its target."""
    site = tmp_path / "site.yaml"
    shutil.copy(EXAMPLE, site)
    (tmp_path / "secrets").mkdir()
    target = tmp_path / "elsewhere" / "planted.secret"
    target.parent.mkdir()
    (tmp_path / "secrets" / "desk-1.secret").symlink_to(target)
    result = run_cli("secrets", "init", str(site))
    assert not target.exists()
    assert_refused(result, f"{site}:{desk1_line(site)}: desks[0].secret_file: ", "is a symbolic link",
                   "secrets init` write")
    created = sorted(p.name for p in (tmp_path / "secrets").iterdir() if not p.is_symlink())
    assert "sidecar.users" in created  # 8 secrets, and the users file (empty)
    assert len(created) == 9 and all(stat.S_IMODE((tmp_path / "secrets" / n).stat().st_mode) == 0o600
                                     for n in created)


def test_secrets_init_leaves_a_link_to_an_existing_file_alone(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    shutil.copy(EXAMPLE, site)
    (tmp_path / "secrets").mkdir()
    kept = tmp_path / "kept.txt"
    kept.write_text("do not touch\n")
    (tmp_path / "secrets" / "desk-1.secret").symlink_to(kept)
    assert_refused(run_cli("secrets", "init", str(site)), f"{site}:", "is a symbolic link")
    assert kept.read_text() == "do not touch\n"


def test_pure_python_yaml_is_held_to_the_same_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyYAML built without libyaml (no CSafeLoader) gets the pure-Python loader, with every limit kept."""
    from sip_refuge.config import source

    monkeypatch.delattr(yaml, "CSafeLoader")
    pure = importlib.reload(source)
    try:
        assert pure._Loader.__mro__[1] is yaml.SafeLoader
        for name, text, needle in [("deep-blocks", "".join("  " * i + f"k{i}:\n" for i in range(40)), "nested deeper"),
                                   ("alias-loop", "site: &a [*a]\n", "aliases expand to more than")]:
            with pytest.raises(ConfigError) as refused:
                pure.load_yaml(write(tmp_path / f"{name}.yaml", text))
            assert needle in str(refused.value), (name, str(refused.value))
        assert pure.load_yaml(write(tmp_path / "fine.yaml", "site: {name: x}\n")).data == {"site": {"name": "x"}}
    finally:
        monkeypatch.undo()
        importlib.reload(source)
