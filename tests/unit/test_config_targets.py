"""CCTV target settings that would stop the sidecar's start are found by the site check (``config check``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sip_refuge.config import load_site
from sip_refuge.config.secrets import init_secrets
from sip_refuge.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "site.example.yaml"
WEBHOOK = """  - type: webhook
    name: vms-hook
    url: https://vms.example/hooks/refuge
    secret_file: secrets/webhook.secret   # Standard Webhooks signing key (whsec_...)
"""


@pytest.fixture()
def site_copy(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    shutil.copy(EXAMPLE, path)
    init_secrets(load_site(path, check_secrets=False))
    return path


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


@pytest.mark.parametrize("key", ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_Ab3dEf5hIj7kLm9nOp1qR", "whsec_",
                                 "whsec_!!!!", "whsec_a", "whsec_ab", "whsec_abc=", "whsec_a===", "MfKQ9r8G", ""])
def test_the_webhook_key_check_agrees_with_the_library(key: str) -> None:
    """`config check` judges a key without standardwebhooks (not in the base install), as the library does."""
    from standardwebhooks import Webhook

    from sip_refuge.config.loader import webhook_key_problem

    try:
        Webhook(key)
        library_accepts = True
    except Exception:  # noqa: BLE001 - the library raises several kinds for a malformed key
        library_accepts = False
    assert (webhook_key_problem(key) is None) == library_accepts
