"""Fixtures many unit modules share: the example site with fresh secrets, its hub on an in-memory store, a store
on disk, and a copy of the example site file.

A module that needs another site (a pair, more close-out reasons, the two-post receivers' site) or another store
defines its own ``site`` or ``store``; the fixtures here that use them then get that one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sip_refuge.config import Site, load_site
from sip_refuge.sidecar.core import Hub
from sip_refuge.sidecar.store import Store
from tests.support.hubs import memory_hub
from tests.support.sites import example_copy


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """The example site with fresh secrets, one per test module."""
    return load_site(example_copy(tmp_path_factory.mktemp("site")))


@pytest.fixture()
def hub(site: Site) -> Iterator[Hub]:
    """The site's hub on an in-memory store with no CCTV target."""
    with memory_hub(site) as made:
        yield made


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    """A store on disk, ``var/refuge.sqlite3`` in the test's folder; closed after."""
    with Store(tmp_path / "var" / "refuge.sqlite3") as opened:
        yield opened


@pytest.fixture()
def site_copy(tmp_path: Path) -> Path:
    """A copy of the example site with freshly generated secrets."""
    return example_copy(tmp_path)
