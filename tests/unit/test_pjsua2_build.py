"""The pjsua2 build recipe's pure parts: its cache key and reuse, the mirror it reads, the wheel it writes."""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from pathlib import Path

import pytest

from sip_refuge.post.sip import pjsua2_build as build
from sip_refuge.post.sip.pjsua2_build import BUILD_PACKAGES, PJPROJECT, Target
from sip_refuge.post.sip.pjsua2_cross import HOST_PACKAGES

REPO = Path(__file__).resolve().parents[2]


def test_make_deps_installs_every_build_package() -> None:
    text = (REPO / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    listed = re.search(r"^DEB_PACKAGES := (.*)$", text, re.M)
    assert listed is not None
    assert set(BUILD_PACKAGES) | set(HOST_PACKAGES) <= set(listed.group(1).split())


def test_the_pi_target_is_debian_12s_python_on_arm64_from_the_cached_sysroot(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SIP_REFUGE_CACHE", str(tmp_path))
    pi = Target.for_machine("aarch64")
    assert pi.cross is not None
    sysroot = pi.cross.sysroot
    assert sysroot.parent == tmp_path / "pjsua2" and sysroot.name.startswith("sysroot-bookworm-arm64-")
    assert pi.key == f"pjproject-{PJPROJECT}-{build.recipe_id()}-cp311-linux_aarch64"
    assert pi.wheel_name == f"pjsua2-{PJPROJECT}+refuge.{build.recipe_id()}-cp311-cp311-linux_aarch64.whl"
    assert (pi.ext_suffix, pi.cxx) == (".cpython-311-aarch64-linux-gnu.so", "aarch64-linux-gnu-g++")
    assert pi.python_include == sysroot / "usr/include/python3.11"
    assert pi.cross.configure_args() == ("--host=aarch64-linux-gnu", f"--with-ssl={sysroot}")
    assert pi.cross.build_env()["LDFLAGS"] == pi.cross.cflags == f"--sysroot={sysroot}"
    assert Target.for_machine("native") == Target.native()


def test_cache_key_names_pjproject_recipe_python_and_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SIP_REFUGE_CACHE", str(tmp_path))
    native = Target.native()
    arm = Target("cp311", "linux_aarch64", ".cpython-311-aarch64-linux-gnu.so", Path("/x"))
    assert native.key.startswith(f"pjproject-{PJPROJECT}-{build.recipe_id()}-{native.python_tag}-")
    assert arm.key != native.key or native.platform_tag == "linux_aarch64"
    assert build.wheel_path(native).parent == tmp_path / "pjsua2" / native.key
    assert native.wheel_name.endswith(f"-{native.python_tag}-{native.python_tag}-{native.platform_tag}.whl")


def test_a_cached_wheel_is_returned_without_building(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SIP_REFUGE_CACHE", str(tmp_path))
    wheel = build.wheel_path(Target.native())
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"cached")
    said: list[str] = []
    assert build.ensure_wheel(progress=said.append) == wheel
    assert said == [f"pjsua2: cached wheel {wheel}"]
    assert not (tmp_path / "pjsua2" / "src").exists()  # nothing fetched


def test_mirror_is_read_from_apt_and_skips_security_and_vendor_archives(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SIP_REFUGE_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("# comment\ndeb http://mirror.invalid/debian-security bookworm-security main\n",
                                           encoding="utf-8")
    (tmp_path / "sources.list.d" / "a-vendor.list").write_text("deb http://vendor.invalid/apt stable main\n",
                                                               encoding="utf-8")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian/\nSuites: bookworm\nComponents: main\n", encoding="utf-8")
    assert build.debian_mirror(tmp_path) == "http://mirror.invalid/debian"
    (tmp_path / "sources.list").write_text("deb [arch=arm64 signed-by=/k.gpg] http://other.invalid/debian bookworm main\n",
                                           encoding="utf-8")
    assert build.debian_mirror(tmp_path) == "http://other.invalid/debian"


def test_no_mirror_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SIP_REFUGE_DEBIAN_MIRROR", raising=False)
    with pytest.raises(build.SipError, match="no Debian mirror found"):
        build.debian_mirror(tmp_path)


def test_wheel_carries_the_files_with_a_matching_record(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    target = Target.native()
    (stage / "pjsua2.py").write_text("# the SWIG module\n", encoding="utf-8")
    (stage / f"_pjsua2{target.ext_suffix}").write_bytes(b"\x7fELF" + bytes(100))
    wheel = tmp_path / target.wheel_name
    build.write_wheel(stage, wheel, target)
    with zipfile.ZipFile(wheel) as zf:
        info = f"pjsua2-{target.version}.dist-info"
        record = zf.read(f"{info}/RECORD").decode().splitlines()
        assert f"Tag: {target.python_tag}-{target.python_tag}-{target.platform_tag}" in zf.read(f"{info}/WHEEL").decode()
        assert f"Version: {target.version}" in zf.read(f"{info}/METADATA").decode()
        for line in record:
            name, digest, size = line.rsplit(",", 2)
            if name.endswith("RECORD"):
                continue
            data = zf.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (f"sha256={expected}", len(data))
        assert sorted(zf.namelist()) == sorted(line.split(",")[0] for line in record)


def test_missing_capabilities_are_named() -> None:
    full = {"codecs": ["PCMU/8000/1", "G722/16000/1", "opus/48000/2"], "tls": "TLS", "srtp": ["AES_CM_128_HMAC_SHA1_80"],
            "srtp_use": True, "handle_events": True}
    assert build.missing_features(full) == []
    poor = {**full, "codecs": ["PCMU/8000/1"], "tls": "no: not supported", "srtp": []}
    assert build.missing_features(poor) == ["G722/16000", "opus/48000", "TLS transport (no: not supported)", "SRTP"]
