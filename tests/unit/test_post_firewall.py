"""The shipped post firewall (config/nftables-post.nft) is a ruleset nft accepts, and says what the admin
guide says it does: SIP and RTP with the PBX only, in and out. Checked with ``nft -c`` (changes nothing)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

RULES = Path(__file__).resolve().parents[2] / "config" / "nftables-post.nft"


def nft_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30, check=False)


def test_nft_accepts_the_shipped_ruleset() -> None:
    done = nft_check(RULES)
    assert done.returncode == 0, done.stderr


def test_nft_check_really_checks(tmp_path: Path) -> None:
    broken = tmp_path / "broken.nft"
    broken.write_text(RULES.read_text(encoding="utf-8").replace("policy drop;", "policy dorp;", 1), encoding="utf-8")
    assert nft_check(broken).returncode != 0


def test_both_directions_drop_by_default_and_open_only_to_the_pbx() -> None:
    text = RULES.read_text(encoding="utf-8")
    chains = dict(re.findall(r"chain (\w+) \{(.*?)\n    \}", text, re.DOTALL))
    assert set(chains) == {"input", "output"}
    assert "hook input priority filter; policy drop;" in chains["input"]
    assert "hook output priority filter; policy drop;" in chains["output"]
    assert "ip saddr $PBX meta l4proto { udp, tcp } accept" in chains["input"]
    assert "ip daddr $PBX meta l4proto { udp, tcp } accept" in chains["output"]
    # No rule lets UDP in or out to anyone else except DHCP, DNS and NTP with the named services.
    udp_rules = [line.strip() for body in chains.values() for line in body.splitlines() if "udp" in line]
    assert all("$PBX" in r or "$SERVICES" in r or "sport 6" in r for r in udp_rules), udp_rules
