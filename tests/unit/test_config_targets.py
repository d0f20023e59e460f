"""CCTV target settings that would stop the sidecar's start are found by the site check (``config check``)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from sip_refuge.config import cctv, load_site
from sip_refuge.errors import ConfigError

WEBHOOK = """  - type: webhook
    name: vms-hook
    url: https://vms.example/hooks/refuge
    secret_file: secrets/webhook.secret   # Standard Webhooks signing key (whsec_...)
"""


def add_targets(path: Path, extra: str) -> None:
    text = path.read_text()
    assert WEBHOOK in text
    path.write_text(text.replace(WEBHOOK, WEBHOOK + extra, 1))


def problems_of(path: Path, *, check_secrets: bool = True) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_site(path, check_secrets=check_secrets)
    return [str(p) for p in info.value.problems]


def test_good_templates_load(site_copy: Path) -> None:
    add_targets(site_copy, "  - {type: milestone, name: xprotect, host: 10.0.0.9, template: '{type} {post_name}'}\n"
                           "  - type: webhook\n    name: hook-2\n    url: https://vms.example/b\n"
                           "    secret_file: secrets/webhook.secret\n"
                           "    body_template: '{\"post\": {{ post.id | tojson }}}'\n")
    site = load_site(site_copy)
    assert [t.name for t in site.cctv][1:3] == ["xprotect", "hook-2"]


def test_milestone_template_with_an_unknown_field_is_a_config_error(site_copy: Path) -> None:
    add_targets(site_copy, "  - {type: milestone, name: xprotect, host: 10.0.0.9, template: '{type} {post}'}\n")
    [problem] = problems_of(site_copy)
    assert "template" in problem and "unknown fields post" in problem


def test_milestone_template_with_bad_syntax_is_a_config_error(site_copy: Path) -> None:
    add_targets(site_copy, "  - {type: milestone, name: xprotect, host: 10.0.0.9, template: '{type'}\n")
    [problem] = problems_of(site_copy)
    assert "milestone template" in problem


def test_webhook_body_template_syntax_error_is_a_config_error(site_copy: Path) -> None:
    add_targets(site_copy, "  - type: webhook\n    name: hook-2\n    url: https://vms.example/b\n"
                           "    secret_file: secrets/webhook.secret\n    body_template: '{{ post.id '\n")
    [problem] = problems_of(site_copy)
    assert "body_template" in problem


def test_webhook_secret_that_is_no_whsec_key_is_a_config_error_only_when_secrets_are_checked(
        site_copy: Path) -> None:
    secret = site_copy.parent / "secrets" / "webhook.secret"
    secret.write_text("whsec_Ab3dEf5hIj7kLm9nOp1qR\n")  # 21 base64 characters: not a whole number of bytes
    [problem] = problems_of(site_copy)
    assert "secret_file" in problem and "not a valid Standard Webhooks key" in problem
    assert "Ab3dEf5h" not in problem  # never the secret itself
    load_site(site_copy, check_secrets=False)  # ``secrets init`` must still load the site


def test_config_check_reports_a_bad_template(site_copy: Path) -> None:
    add_targets(site_copy, "  - {type: milestone, name: xprotect, host: 10.0.0.9, template: '{nope}'}\n")
    done = subprocess.run([sys.executable, "-m", "sip_refuge.cli", "config", "check", str(site_copy)],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "unknown fields nope" in done.stdout + done.stderr


def test_loading_a_site_does_not_import_the_webhook_libraries() -> None:
    code = ("import sys; from sip_refuge.config import loader; "
            "print(sorted(m for m in ('jinja2', 'flask', 'standardwebhooks') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# -- the registry of target kinds ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(cctv.KINDS))
def test_each_target_module_declares_the_kind_options_and_reader_the_loader_uses(name: str) -> None:
    kind = cctv.KINDS[name]
    module = importlib.import_module(f"sip_refuge.sidecar.targets.{name}")
    assert (module.KIND, module.Options, module.read) == (kind.name, kind.options, kind.read)
    assert callable(module.from_config)


def test_every_kind_loads_into_its_options_dataclass_and_builds_its_target(site_copy: Path) -> None:
    (site_copy.parent / "secrets" / "nx.secret").write_text("nx-admin-password-1\n")
    (site_copy.parent / "secrets" / "nx.secret").chmod(0o600)
    add_targets(site_copy, "  - {type: milestone, name: xprotect, host: 10.0.0.9, port: 1235, echo: false}\n"
                           "  - {type: nx, name: nx, url: 'https://10.0.0.8:7001', username: admin,"
                           " password_file: secrets/nx.secret, api: v4, cameras: {idlewells: cam-2}}\n"
                           "  - {type: vlc, name: wall, url: 'http://10.0.0.7:8080', password_file: secrets/nx.secret}\n")
    site = load_site(site_copy)
    by_name = {t.name: t for t in site.cctv}
    assert by_name["xprotect"].options == cctv.milestone.MilestoneOptions("10.0.0.9", 1235, "{type} {post_id}", False)
    assert by_name["nx"].options == cctv.nx.NxOptions("https://10.0.0.8:7001", "admin", "v4", True,
                                                      {"idlewells": "cam-2"})
    assert by_name["wall"].options == cctv.vlc.VlcOptions("http://10.0.0.7:8080")
    assert isinstance(by_name["vms-hook"].options, cctv.webhook.WebhookOptions)
    from sip_refuge.sidecar.targets import make_target

    built = [make_target(t) for t in site.cctv]
    assert [type(t).__name__ for t in built] == ["WebhookTarget", "MilestoneTarget", "NxTarget", "VlcTarget"]
    for target in built:
        target.close()


def test_the_operator_target_still_loads_with_a_warning_and_makes_no_target(site_copy: Path) -> None:
    add_targets(site_copy, "  - type: operator                        # the built-in pop-up page\n")
    site = load_site(site_copy)
    assert [t.type for t in site.cctv] == ["webhook"]
    [warning] = site.warnings
    assert warning.path == "cctv[1].type" and "'operator' is deprecated" in warning.message
    assert warning.line == site_copy.read_text().splitlines().index(
        "  - type: operator                        # the built-in pop-up page") + 1
    done = subprocess.run([sys.executable, "-m", "sip_refuge.cli", "config", "check", str(site_copy)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{site_copy}:{warning.line}: cctv[1].type: warning: 'operator' is deprecated" in done.stderr


def test_an_unknown_target_type_names_the_known_ones(site_copy: Path) -> None:
    add_targets(site_copy, "  - {type: genetec, name: gsc}\n")
    [problem] = problems_of(site_copy)
    assert "cctv[1].type: 'genetec' must be one of: webhook, milestone, nx, vlc, operator" in problem


# -- close-out reasons and references ---------------------------------------------------------------------------

def with_sidecar_lines(path: Path, lines: str) -> None:
    text = path.read_text()
    path.write_text(text.replace("  camera_interval: 60s", "  camera_interval: 60s\n" + lines, 1))


def test_close_reasons_default_to_the_list_and_take_labels_or_ids(site_copy: Path) -> None:
    assert [r.id for r in load_site(site_copy).close_reasons] == \
        ["assistance", "police", "ambulance", "advice", "no-one-there", "misuse", "test"]
    with_sidecar_lines(site_copy, "  close_reasons: [Advice given, {id: fire, label: Fire brigade}]")
    reasons = load_site(site_copy).close_reasons
    assert [(r.id, r.label) for r in reasons] == [("advice-given", "Advice given"), ("fire", "Fire brigade")]


@pytest.mark.parametrize("value, message", [
    ("[]", "close_reasons: list at least one reason"),
    ("[Fire, fire]", "close_reasons[1]: 'fire' is listed twice"),
    ("[{id: Fire!, label: Fire}]", "close_reasons[0].id: 'Fire!' must be lowercase"),
    ("[{id: fire}]", "close_reasons[0].label: is required"),
    ("[\"Ça va\"]", "close_reasons[0]: 'ça-va' cannot be an id"),
    ("[" + "x" * 81 + "]", "close_reasons[0]: a label is 1 to 80 characters"),
])
def test_bad_close_reasons_are_located(site_copy: Path, value: str, message: str) -> None:
    with_sidecar_lines(site_copy, f"  close_reasons: {value}")
    assert any(message in p for p in problems_of(site_copy)), problems_of(site_copy)


def test_the_reference_prefix_comes_from_the_site_name_unless_given(site_copy: Path) -> None:
    assert load_site(site_copy).reference_prefix == "ASH"
    text = site_copy.read_text()
    site_copy.write_text(text.replace("  name: Ashfield Refuge Points", "  name: 42 Kirkby\n  reference_prefix: K1", 1))
    assert load_site(site_copy).reference_prefix == "K1"
    site_copy.write_text(text.replace("  name: Ashfield Refuge Points", "  name: 42\n  reference_prefix: kir", 1))
    [problem] = problems_of(site_copy)
    assert "site.reference_prefix: 'kir' must be 1 to 8 capital letters" in problem
    from sip_refuge.config.loader import reference_prefix

    assert (reference_prefix("42 Kirkby Points"), reference_prefix("Ça Gare"), reference_prefix("12")) == \
        ("KIR", "AGA", "REF")


@pytest.mark.parametrize("key", ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_Ab3dEf5hIj7kLm9nOp1qR", "whsec_",
                                 "whsec_!!!!", "whsec_a", "whsec_ab", "whsec_abc=", "whsec_a===", "MfKQ9r8G", ""])
def test_the_webhook_key_check_agrees_with_the_library(key: str) -> None:
    """`config check` judges a key without standardwebhooks (not in the base install), as the library does."""
    from standardwebhooks import Webhook

    from sip_refuge.config.cctv.webhook import check_key

    try:
        Webhook(key)
        library_accepts = True
    except Exception:  # noqa: BLE001 - the library raises several kinds for a malformed key
        library_accepts = False
    assert (check_key(key) is None) == library_accepts
