"""The Asterisk renderer: golden files, secrets kept apart, the post context locked down, template errors.

Goldens live in tests/golden/<case>/; regenerate them with UPDATE_GOLDEN=1 after a deliberate change
and review the diff like code.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from sip_refuge.config import Site, load_site
from sip_refuge.config.users import init_users_file
from sip_refuge.errors import PbxError
from sip_refuge.pbx.render import (
    INCLUDE_FILES,
    SANDBOX_FILES,
    TEMPLATES,
    SandboxDirs,
    is_secret,
    render,
    render_sandbox,
    write,
)

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
CASES = {"example": REPO / "config" / "site.example.yaml", "tls": GOLDEN / "tls-site.yaml"}
COMMAND = "sip-refuge asterisk render site.yaml --out asterisk"
SITE_DIR = "/srv/refuge"  # what the temporary site folder is called in the goldens
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def fixed_secret(name: str, kind: str) -> str:
    value = hashlib.sha256(f"sip-refuge test {name}".encode()).hexdigest()[:32]
    return f"whsec_{value}" if kind == "webhook" else value


def make_site(tmp_path: Path, source: Path) -> Site:
    """Copy a site file to tmp_path and give every secret a fixed value, so output is deterministic."""
    path = tmp_path / "site.yaml"
    shutil.copy(source, path)
    unchecked = load_site(path, check_secrets=False)
    for name, secret in unchecked.secrets():
        assert secret.file is not None
        secret.file.parent.mkdir(parents=True, exist_ok=True)
        secret.file.write_text(fixed_secret(name, secret.kind) + "\n", encoding="utf-8")
        secret.file.chmod(0o600)
    if unchecked.sidecar is not None and unchecked.sidecar.users_file is not None:
        init_users_file(unchecked.sidecar.users_file)  # no operators: the renderer never reads it
    return load_site(path)


def normalised(text: str, tmp_path: Path) -> str:
    return text.replace(str(tmp_path), SITE_DIR)


def check_golden(case: str, files: dict[str, str], tmp_path: Path) -> None:
    folder = GOLDEN / case
    if UPDATE:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_text(normalised(text, tmp_path), encoding="utf-8")
    expected = {p.name for p in folder.glob("*")} if folder.is_dir() else set()
    assert expected == set(files), f"golden files of {case} differ from the rendered set; run with UPDATE_GOLDEN=1"
    for name, text in files.items():
        want = (folder / name).read_text(encoding="utf-8")
        assert normalised(text, tmp_path) == want, f"{case}/{name} differs from its golden; UPDATE_GOLDEN=1 to accept"


def sandbox_dirs(root: Path) -> SandboxDirs:
    return SandboxDirs(etc=root / "etc", modules=root / "modules", data=root / "data", run=root / "run",
                       log=root / "log", spool=root / "spool", lib=root / "lib", db=root / "db", keys=root / "keys")


def contexts(conf: str) -> dict[str, list[str]]:
    """Section name -> its non-comment lines (comments and blank lines dropped)."""
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in conf.splitlines():
        line = re.sub(r"(?<!\\);.*", "", raw).strip()
        if not line:
            continue
        head = re.fullmatch(r"\[([^\]]+)\](\(.*\))?", line)
        if head:
            current = out.setdefault(head.group(1), [])
        else:
            current.append(line)
    return out


def extensions(lines: list[str]) -> set[str]:
    return {m.group(1) for line in lines if (m := re.match(r"exten\s*=>\s*([^,]+),", line))}


@pytest.fixture()
def example(tmp_path: Path) -> Site:
    return make_site(tmp_path, CASES["example"])


@pytest.fixture()
def tls(tmp_path: Path) -> Site:
    return make_site(tmp_path, CASES["tls"])


# -- golden files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_include_files_match_golden(case: str, tmp_path: Path) -> None:
    site = make_site(tmp_path, CASES[case])
    check_golden(case, render(site, command=COMMAND), tmp_path)


def test_sandbox_files_match_golden(tmp_path: Path) -> None:
    site = make_site(tmp_path, CASES["example"])
    files = render_sandbox(site, sandbox_dirs(tmp_path / "sandbox"), command="sip-refuge pbx site.yaml")
    assert set(files) == set(INCLUDE_FILES) | set(SANDBOX_FILES)
    check_golden("sandbox", {n: t for n, t in files.items() if n in SANDBOX_FILES}, tmp_path)


def test_render_is_deterministic(example: Site) -> None:
    assert render(example, command=COMMAND) == render(example, command=COMMAND)


# -- what every file says about itself -----------------------------------------------------------

def test_every_file_names_site_command_and_reload(example: Site, tmp_path: Path) -> None:
    files = render_sandbox(example, sandbox_dirs(tmp_path / "sb"), command="the-command --x")
    for name, text in files.items():
        head = text[:1200]
        assert f"; {name} - " in head, name
        assert str(example.path) in head and "the-command --x" in head, name
        assert "GENERATED" in head and "Reload after a change:" in head, name


# -- secrets ----------------------------------------------------------------------------------------

def test_secrets_only_in_secret_files(example: Site) -> None:
    files = render(example, command=COMMAND)
    values = {name: secret.read() for name, secret in example.secrets()}
    in_asterisk = {k: v for k, v in values.items() if k == "pbx.ami" or k.startswith(("posts.", "desks."))
                   and not k.endswith(".camera")}
    for name, text in files.items():
        leaked = [k for k, v in values.items() if v in text]
        if is_secret(name):
            continue
        assert not leaked, f"{name} holds secrets of {leaked}"
    joined = files["pjsip_refuge_secrets.conf"] + files["manager_refuge.conf"]
    for key, value in in_asterisk.items():
        assert value in joined, f"{key} is missing from the secret files"
    assert values["pbx.ami"] in files["manager_refuge.conf"]


def test_write_gives_secret_files_mode_600(example: Site, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "pjsip_refuge_secrets.conf").write_text("old")
    (out / "pjsip_refuge_secrets.conf").chmod(0o644)  # an old world-readable copy must be tightened
    paths = write(render(example, command=COMMAND), out)
    assert {p.name for p in paths} == set(INCLUDE_FILES)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert modes["pjsip_refuge_secrets.conf"] == 0o600
    assert modes["manager_refuge.conf"] == 0o600
    assert modes["extensions_refuge.conf"] == 0o644
    assert not list(out.glob(".*.tmp"))


def test_semicolon_in_secret_is_escaped_and_control_characters_refused(example: Site) -> None:
    post = example.posts[0]
    assert post.secret.file is not None
    post.secret.file.write_text("abc;def-0123456789xyz\n")
    text = render(example, command=COMMAND)["pjsip_refuge_secrets.conf"]
    assert r"password=abc\;def-0123456789xyz" in text
    post.secret.file.write_text("abcdef0123456789\rinjected=1\n")
    with pytest.raises(PbxError, match=post.id):
        render(example, command=COMMAND)


# -- endpoints --------------------------------------------------------------------------------------

def test_posts_and_desks_are_endpoints_with_their_template(tls: Site) -> None:
    sections = contexts(render(tls, command=COMMAND)["pjsip_refuge.conf"])
    pyvoip = sections["refuge-post-pyvoip"]
    assert "allow=ulaw,alaw" in pyvoip and "media_encryption=no" in pyvoip and "disallow=all" in pyvoip
    assert "allow=g722,ulaw,alaw" in sections["refuge-phone"]
    for post in tls.posts:
        text = render(tls, command=COMMAND)["pjsip_refuge.conf"]
        assert f"[{post.id}](refuge-post-{post.sip_backend})" in text
    park = sections["park-gate"]  # the endpoint and the aor share the id
    assert 'callerid="Park Gate North" <501>' in park  # ';' in the name would start a comment
    assert "auth=park-gate-auth" in park and "acl=refuge-posts" in park and "contact_acl=refuge-posts" in park
    assert "max_contacts=1" in sections["refuge-aor"] and "qualify_frequency=15" in sections["refuge-aor"]


def media_encryption(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("media_encryption")]


def test_tls_site_has_posts_on_tls_with_mandatory_srtp_and_desks_on_udp(tls: Site) -> None:
    files = render(tls, command=COMMAND)
    transports = contexts(files["pjsip_refuge_transport.conf"])
    assert f"cert_file={tls.path.parent}/tls/pbx.crt" in transports["transport-refuge-tls"]
    assert "bind=0.0.0.0:5061" in transports["transport-refuge-tls"]
    assert "bind=0.0.0.0:5060" in transports["transport-refuge-udp"]  # the desks'
    sections = contexts(files["pjsip_refuge.conf"])
    assert media_encryption(sections["refuge-phone"]) == ["media_encryption=no"]
    # An endpoint's later line wins: posts get SDES-SRTP, never falling back to plain RTP.
    assert media_encryption(sections["refuge-post-pjsua2"]) == ["media_encryption=sdes",
                                                                "media_encryption_optimistic=no"]
    assert media_encryption(sections["refuge-desk"]) == ["media_encryption=no"]
    assert {f"[{p.id}](refuge-post-pjsua2)" for p in tls.posts} <= set(files["pjsip_refuge.conf"].splitlines())


def test_desks_on_tls_get_srtp_too_and_no_plain_transport(tmp_path: Path) -> None:
    source = tmp_path / "source.yaml"
    source.write_text(CASES["tls"].read_text().replace("    desks: udp\n", "    desks: tls\n"))
    files = render(make_site(tmp_path, source), command=COMMAND)
    transports = contexts(files["pjsip_refuge_transport.conf"])
    assert set(transports) == {"transport-refuge-tls"}
    sections = contexts(files["pjsip_refuge.conf"])
    for template in ("refuge-post-pjsua2", "refuge-desk"):
        assert media_encryption(sections[template]) == ["media_encryption=sdes", "media_encryption_optimistic=no"]


def test_site_without_tls_has_no_srtp(example: Site) -> None:
    files = render(example, command=COMMAND)
    assert "sdes" not in files["pjsip_refuge.conf"]
    assert set(contexts(files["pjsip_refuge_transport.conf"])) == {"transport-refuge-udp"}
    sections = contexts(files["pjsip_refuge.conf"])
    for template in ("refuge-phone", "refuge-post-pjsua2", "refuge-desk"):
        assert media_encryption(sections[template]) in ([], ["media_encryption=no"])


def test_no_networks_means_no_acl(example: Site, tmp_path: Path) -> None:
    source = CASES["example"].read_text().replace("  networks:", "  _networks:")
    source = re.sub(r"\n  _networks:.*\n.*\n.*\n", "\n", source)
    path = tmp_path / "plain.yaml"
    path.write_text(source)
    files = render(load_site(path), command=COMMAND)
    assert "acl=" not in files["pjsip_refuge.conf"]
    assert not contexts(files["acl_refuge.conf"])


# -- dialplan ---------------------------------------------------------------------------------------

def test_post_context_reaches_only_queue_and_self_test(example: Site) -> None:
    text = render(example, command=COMMAND)["extensions_refuge.conf"]
    assert not re.search(r"^\s*include\s*=>", text, re.M), "no context may include another"
    post = contexts(text)["refuge-post"]
    assert extensions(post) == {example.queue.extension, example.self_test.extension, "_[!-~]", "_[!-~]."}
    forbidden = ["999", "112", "00441234567890", "+441234567890", "9011441234567890", example.desks[0].extension,
                 example.posts[1].extension, example.queue.overflow, "s", "h", "i", "t", "*97", "0", "7" * 200,
                 f"{example.queue.extension}&PJSIP/x"]
    assert not set(forbidden) & extensions(post)
    # The only Dial()/Queue() reachable from a post are in refuge-alarm, the overflow hand-off and the test.
    assert not any("Dial(" in line or "Queue(" in line for line in post)


def test_exten_is_filtered_before_use(example: Site) -> None:
    text = render(example, command=COMMAND)["extensions_refuge.conf"]
    for line in text.splitlines():
        code = re.sub(r"(?<!\\);.*", "", line)
        for use in re.finditer(r"\$\{EXTEN", code):
            before = code[:use.start()]
            assert before.endswith("FILTER(0-9A-Za-z*#+,"), f"raw ${{EXTEN}}: {line}"


def test_alarm_is_not_answered_before_the_queue(example: Site) -> None:
    alarm = contexts(render(example, command=COMMAND)["extensions_refuge.conf"])["refuge-alarm"]
    queue_at = next(i for i, line in enumerate(alarm) if "Queue(refuge,r,,,30)" in line)
    assert not any("Answer(" in line for line in alarm[:queue_at])
    assert any("QUEUE_PRIO=10" in line for line in alarm[:queue_at])
    assert any("Goto(refuge-overflow,s,1)" in line for line in alarm[queue_at:])


def test_desks_call_posts_back_with_auto_answer_headers(example: Site) -> None:
    sections = contexts(render(example, command=COMMAND)["extensions_refuge.conf"])
    desk = "\n".join(sections["refuge-desk"])
    for post in example.posts:
        assert f"Dial(PJSIP/{post.id},60,b(refuge-autoanswer^s^1))" in desk
    for d in example.desks:
        assert f"exten => {d.extension},1,Dial(PJSIP/{d.id},60)" in desk
    auto = "\n".join(sections["refuge-autoanswer"])
    assert r"Call-Info)=<sip:127.0.0.1>\;answer-after=0" in auto
    assert r"Alert-Info)=<http://127.0.0.1>\;info=alert-autoanswer" in auto


def test_queue_rings_every_desk_and_leaves_when_none_can_answer(example: Site) -> None:
    queue = contexts(render(example, command=COMMAND)["queues_refuge.conf"])["refuge"]
    for option in ("strategy=ringall", "timeout=15", "retry=2", "ringinuse=no", "setinterfacevar=yes",
                   "joinempty=paused,unavailable,invalid,unknown", "leavewhenempty=paused,unavailable,invalid,unknown"):
        assert option in queue
    assert "member => PJSIP/desk-1,0,Operator Desk 1,PJSIP/desk-1" in queue


def test_ami_user_is_read_only_and_loopback(example: Site) -> None:
    user = contexts(render(example, command=COMMAND)["manager_refuge.conf"])["sidecar"]
    # reporting is the one write class that only queries state (the sidecar's resync needs it).
    assert "write=reporting" in user and "deny=0.0.0.0/0.0.0.0" in user and "permit=127.0.0.1/255.255.255.255" in user
    assert any(line.startswith("read=system,call,agent") for line in user)


def test_sandbox_binds_loopback_ports_from_the_site(example: Site, tmp_path: Path) -> None:
    files = render_sandbox(example, sandbox_dirs(tmp_path / "sb"), command=COMMAND)
    assert "port = 5038" in files["manager.conf"] and "bindaddr = 127.0.0.1" in files["manager.conf"]
    assert "bind=127.0.0.1:5060" in files["pjsip_refuge_transport.conf"]
    assert "rtpstart = 10000" in files["rtp.conf"] and "rtpend = 20000" in files["rtp.conf"]
    assert f"astlogdir => {tmp_path / 'sb' / 'log'}" in files["asterisk.conf"]
    assert "security.log => security" in files["logger.conf"]
    modules = files["modules.conf"]
    assert "autoload=no" in modules and "endpoint_identifier_anonymous" not in modules
    assert modules.index("load => chan_pjsip.so") < modules.index("load => app_queue.so")


# -- template errors --------------------------------------------------------------------------------

def broken_templates(tmp_path: Path, name: str, old: str, new: str) -> Path:
    folder = tmp_path / "templates"
    shutil.copytree(TEMPLATES, folder)
    path = folder / name
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return folder


def line_of(folder: Path, name: str, needle: str) -> int:
    return next(i for i, line in enumerate((folder / name).read_text().splitlines(), 1) if needle in line)


def test_template_syntax_error_names_file_and_line(example: Site, tmp_path: Path) -> None:
    folder = broken_templates(tmp_path, "queues_refuge.conf.j2", "{% for d in desks %}", "{% for d in desks %")
    with pytest.raises(PbxError) as info:
        render(example, command=COMMAND, templates=folder)
    assert f"{folder / 'queues_refuge.conf.j2'}:" in str(info.value)
    assert "Traceback" not in str(info.value)


def test_undefined_variable_names_file_and_line(example: Site, tmp_path: Path) -> None:
    folder = broken_templates(tmp_path, "extensions_refuge.conf.j2", "Set(QUEUE_PRIO={{ q.priority }})",
                              "Set(QUEUE_PRIO={{ q.priorty }})")
    with pytest.raises(PbxError) as info:
        render(example, command=COMMAND, templates=folder)
    line = line_of(folder, "extensions_refuge.conf.j2", "q.priorty")
    assert f"extensions_refuge.conf.j2:{line}:" in str(info.value)
    assert "priorty" in str(info.value)


def test_missing_template_folder_is_a_pbx_error(example: Site, tmp_path: Path) -> None:
    with pytest.raises(PbxError, match="does not exist"):
        render(example, command=COMMAND, templates=tmp_path / "nowhere")
