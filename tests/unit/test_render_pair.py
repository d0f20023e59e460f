"""The renderer's PBX pair: one site file, two Asterisks with the same posts, desks and queue, each on its own
address, and a header that says which is which.

Goldens: tests/golden/pair (the primary) and tests/golden/pair-secondary, rendered from tests/golden/pair-site.yaml
(UPDATE_GOLDEN=1 regenerates them, as in test_render.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from sip_refuge.config import Site, load_site
from sip_refuge.config.model import PRIMARY, SECONDARY
from sip_refuge.errors import ConfigError, PbxError
from sip_refuge.pbx.render import INCLUDE_FILES, render, render_sandbox
from tests.unit.test_render import CASES, COMMAND, GOLDEN, check_golden, contexts, make_site, sandbox_dirs

PAIR = GOLDEN / "pair-site.yaml"


@pytest.fixture()
def pair(tmp_path: Path) -> Site:
    return make_site(tmp_path, PAIR)


def loopback_pair(tmp_path: Path, **pbx: object) -> Site:
    """The example site with a secondary at 127.0.0.2 (the loopback pair of `sip-refuge pbx --role secondary`)."""
    site = make_site(tmp_path, CASES["example"])
    data = yaml.safe_load(site.path.read_text(encoding="utf-8"))
    data["pbx"].update(secondary_host="127.0.0.2", **pbx)
    site.path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_site(site.path)


@pytest.mark.parametrize("role", [PRIMARY, SECONDARY])
def test_both_roles_match_their_goldens(role: str, tmp_path: Path) -> None:
    site = make_site(tmp_path, PAIR)
    case = "pair" if role == PRIMARY else "pair-secondary"
    check_golden(case, render(site, command=COMMAND + (" --role secondary" if role == SECONDARY else ""), role=role),
                 tmp_path)


def test_the_secondary_has_the_same_posts_desks_queue_and_dialplan(pair: Site) -> None:
    primary, secondary = render(pair, command=COMMAND), render(pair, command=COMMAND, role=SECONDARY)
    assert set(primary) == set(secondary) == set(INCLUDE_FILES)
    for name in ("pjsip_refuge.conf", "pjsip_refuge_secrets.conf", "queues_refuge.conf", "acl_refuge.conf"):
        assert contexts(primary[name]) == contexts(secondary[name]), name
    # The dialplan differs only where it names the PBX itself (the auto-answer header of a call-back).
    ours, theirs = contexts(primary["extensions_refuge.conf"]), contexts(secondary["extensions_refuge.conf"])
    assert {k: v for k, v in ours.items() if k != "refuge-autoanswer"} == \
        {k: v for k, v in theirs.items() if k != "refuge-autoanswer"}
    assert any("<sip:10.20.0.3>" in line for line in theirs["refuge-autoanswer"])


def test_each_role_binds_its_own_address_and_says_its_role(pair: Site) -> None:
    primary = render(pair, command=COMMAND)["pjsip_refuge_transport.conf"]
    secondary = render(pair, command=COMMAND, role=SECONDARY)["pjsip_refuge_transport.conf"]
    assert "bind=10.20.0.2:5060" in primary and "bind=10.20.0.3:5060" in secondary
    assert "role:      primary PBX of the pair" in primary
    assert "role:      SECONDARY PBX of the pair (pbx.secondary_host 10.20.0.3)" in secondary


def test_a_wildcard_bind_is_kept_on_both(tmp_path: Path) -> None:
    site = loopback_pair(tmp_path, bind="0.0.0.0")
    for role in (PRIMARY, SECONDARY):
        assert "bind=0.0.0.0:" in render(site, command=COMMAND, role=role)["pjsip_refuge_transport.conf"]


def test_the_secondary_lets_the_sidecar_beside_the_primary_follow_its_ami(pair: Site) -> None:
    manager = contexts(render(pair, command=COMMAND, role=SECONDARY)["manager_refuge.conf"])["sidecar"]
    assert "permit=127.0.0.1/255.255.255.255" in manager and "permit=10.20.0.2/255.255.255.255" in manager
    assert "write=reporting" in manager and not [line for line in manager if line.startswith("write=") and
                                                 any(w in line for w in ("system", "call", "command"))]
    only = contexts(render(pair, command=COMMAND)["manager_refuge.conf"])["sidecar"]
    assert [line for line in only if line.startswith("permit=")] == ["permit=127.0.0.1/255.255.255.255"]


def test_loopback_sandbox_of_the_secondary_uses_its_address_and_the_same_ports(tmp_path: Path) -> None:
    site = loopback_pair(tmp_path)
    primary = render_sandbox(site, sandbox_dirs(tmp_path / "a"), command="sip-refuge pbx site.yaml")
    secondary = render_sandbox(site, sandbox_dirs(tmp_path / "b"), command="sip-refuge pbx site.yaml --role secondary",
                               role=SECONDARY)
    def general(files: dict[str, str]) -> list[str]:
        return [line for line in contexts(files["manager.conf"])["general"] if not line.startswith("bindaddr")]

    assert general(primary) == general(secondary)  # the same port and settings
    assert "bindaddr = 127.0.0.1" in primary["manager.conf"]
    assert "bindaddr = 127.0.0.2" in secondary["manager.conf"]
    assert f"bind=127.0.0.2:{site.pbx.sip_port}" in secondary["pjsip_refuge_transport.conf"]
    assert f"bind=127.0.0.1:{site.pbx.sip_port}" in primary["pjsip_refuge_transport.conf"]
    assert "--role secondary" in secondary["asterisk.conf"][:1500]


def test_the_secondary_ami_address_can_be_given(tmp_path: Path) -> None:
    site = loopback_pair(tmp_path)
    data = yaml.safe_load(site.path.read_text(encoding="utf-8"))
    data["pbx"]["ami"]["secondary_host"] = "127.0.0.3"
    site.path.write_text(yaml.safe_dump(data), encoding="utf-8")
    site = load_site(site.path)
    assert site.pbx.ami_of(SECONDARY).host == "127.0.0.3" and site.pbx.ami_of(PRIMARY).host == "127.0.0.1"
    files = render_sandbox(site, sandbox_dirs(tmp_path / "b"), command="x", role=SECONDARY)
    assert "bindaddr = 127.0.0.3" in files["manager.conf"]


def test_no_secondary_to_render_is_a_clear_error(tmp_path: Path) -> None:
    site = make_site(tmp_path, CASES["example"])
    with pytest.raises(PbxError, match="pbx.secondary_host is not set"):
        render(site, command=COMMAND, role=SECONDARY)
    # A site of one PBX says nothing about roles: its files are those of before the pair existed.
    assert "role:" not in render(site, command=COMMAND)["pjsip_refuge.conf"][:1200]


@pytest.mark.parametrize(("pbx", "ami", "message"), [
    ({"secondary_host": "127.0.0.1"}, {}, "pbx.secondary_host: '127.0.0.1' is pbx.host itself"),
    ({}, {"secondary_host": "127.0.0.3"}, "pbx.ami.secondary_host: there is no secondary PBX"),
    ({"register_interval": "2s"}, {}, "pbx.register_interval: '2s' is out of range"),
])
def test_pair_keys_are_checked(pbx: dict[str, object], ami: dict[str, object], message: str, tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    shutil.copy(CASES["example"], path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["pbx"].update(pbx)
    data["pbx"]["ami"].update(ami)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_site(path, check_secrets=False)
    assert any(message in str(p) for p in caught.value.problems), caught.value.problems
