"""No value can write a line of its own into a generated Asterisk file (issue 8, finding 12).

The site file's reader refuses control characters; these tests go around it, building Sites in code with a
hostile value in every text field and path (the site file's own path included), and render every template:
each value is either refused or made harmless, and no generated file ever holds the injected section.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sip_refuge.config import Site, load_site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.errors import PbxError
from sip_refuge.pbx.render import INCLUDE_FILES, SANDBOX_FILES, SandboxDirs, render, render_sandbox

REPO = Path(__file__).resolve().parents[2]
TLS = REPO / "tests" / "golden" / "tls-site.yaml"
INJECTED = "[evil-desk](refuge-desk)"
BREAKS = ["\n", "\r", "\x00", "\x85", "\u2028"]


def hostile(value: str, brk: str = "\n") -> str:
    return f"{value}{brk}{INJECTED}{brk}auth=evil-auth"


def variants(obj: Any, path: str, brk: str) -> Iterator[tuple[str, Any]]:
    """(dotted path, a copy of ``obj`` with the text or path at that place made hostile), for every place."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            for where, changed in variants(getattr(obj, f.name), f"{path}.{f.name}".lstrip("."), brk):
                yield where, dataclasses.replace(obj, **{f.name: changed})
    elif isinstance(obj, tuple):
        for i, item in enumerate(obj):
            for where, changed in variants(item, f"{path}[{i}]", brk):
                yield where, (*obj[:i], changed, *obj[i + 1:])
    elif isinstance(obj, str):
        yield path, hostile(obj, brk)
    elif isinstance(obj, Path):
        yield path, Path(hostile(str(obj), brk))


def sandbox_dirs(root: Path) -> SandboxDirs:
    return SandboxDirs(etc=root / "etc", modules=root / "modules", data=root / "data", run=root / "run",
                       log=root / "log", spool=root / "spool", lib=root / "lib", db=root / "db", keys=root / "keys")


def injected(files: dict[str, str]) -> list[str]:
    """Generated files in which the hostile section starts a line: Asterisk would read it as config."""
    return [name for name, text in files.items()
            if any(line.lstrip().startswith(INJECTED) for line in text.split("\n"))]


@pytest.fixture()
def tls_site(tmp_path: Path) -> Site:
    path = tmp_path / "site.yaml"
    shutil.copy(TLS, path)
    init_secrets(load_site(path, check_secrets=False))
    return load_site(path)


def test_every_field_is_walked(tls_site: Site) -> None:
    places = {where for where, _ in variants(tls_site, "", "\n")}
    for place in ("path", "name", "pbx.host", "pbx.tls.cert_file", "pbx.tls.key_file", "pbx.tls.ca_file",
                  "pbx.networks.posts[1]", "desks[0].name", "desks[0].secret.file", "posts[1].location.address"):
        assert place in places, place


# Every field with the two line ends; the other breaking characters on the fields printed as they are.
RAW = ("path", "pbx.host", "pbx.tls.cert_file", "pbx.tls.key_file", "pbx.tls.ca_file")
CASES = [("\n", None), ("\r", None), *((b, RAW + ("name", "desks[0].name")) for b in BREAKS[2:])]


@pytest.mark.parametrize(("brk", "only"), CASES, ids=[f"U+{ord(b):04X}" for b, _ in CASES])
def test_no_field_of_the_site_reaches_a_generated_file_with_a_line_break(tls_site: Site, tmp_path: Path, brk: str,
                                                                         only: tuple[str, ...] | None) -> None:
    refused: set[str] = set()
    for where, site in variants(tls_site, "", brk):
        if only is not None and where not in only:
            continue
        try:
            files = render_sandbox(site, sandbox_dirs(tmp_path / "sb"), command="sip-refuge pbx site.yaml")
        except PbxError:
            refused.add(where)
            continue
        assert set(files) == set(INCLUDE_FILES) | set(SANDBOX_FILES)
        assert not injected(files), (where, injected(files))
        # What was not refused was made harmless: no control character is left in any file but line ends.
        for name, text in files.items():
            assert not any(c in text for c in BREAKS if c != "\n"), (where, name)
    # The values printed as they are (paths, host) are refused; names are cleaned instead.
    assert set(RAW) <= refused


def test_the_site_files_path_is_refused_in_the_headers(tls_site: Site) -> None:
    site = dataclasses.replace(tls_site, path=Path(hostile("/srv/refuge/site.yaml")))
    with pytest.raises(PbxError, match=r"refusing to write '/srv/refuge/site.yaml\\n\[evil-desk\]"):
        render(site, command="sip-refuge asterisk render site.yaml --out x")


@pytest.mark.parametrize("brk", BREAKS, ids=[f"U+{ord(b):04X}" for b in BREAKS])
def test_the_command_line_and_the_sandbox_folders_are_refused(tls_site: Site, tmp_path: Path, brk: str) -> None:
    with pytest.raises(PbxError, match="control character"):
        render(tls_site, command=hostile("sip-refuge asterisk render site.yaml --out x", brk))
    with pytest.raises(PbxError, match="control character"):
        render_sandbox(tls_site, sandbox_dirs(Path(hostile(str(tmp_path), brk))), command="sip-refuge pbx s.yaml")


def test_the_cli_refuses_an_out_folder_with_a_line_break(tls_site: Site, tmp_path: Path) -> None:
    from sip_refuge.cli import main

    out = tmp_path / "out\n[evil]"
    assert main(["asterisk", "render", str(tls_site.path), "--out", str(out)]) == 2
    assert not out.exists()


def test_templates_still_print_text_as_it_is(tls_site: Site, tmp_path: Path) -> None:
    """The gate marks checked values safe, so nothing is HTML-escaped: an admin's template that uses
    replace, join, upper or ~ on a name with & < > ' gets the characters themselves."""
    from sip_refuge.pbx.render import TEMPLATES

    folder = tmp_path / "templates"
    shutil.copytree(TEMPLATES, folder)
    template = folder / "pjsip_refuge.conf.j2"
    probe = ("; probe: {{ site.name | replace('Golden', 'A&B<c>') }} | {{ ['x&y', '<z>', \"'q'\"] | join(', ') }}"
             " | {{ ('t&' ~ site.pbx.host) | upper }}\n")
    template.write_text(template.read_text(encoding="utf-8") + probe, encoding="utf-8")
    text = render(tls_site, command="c", templates=folder)["pjsip_refuge.conf"]
    assert "; probe: A&B<c> TLS; site | x&y, <z>, 'q' | T&PBX.EXAMPLE.NET\n" in text
