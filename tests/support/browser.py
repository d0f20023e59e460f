"""Headless Debian Chromium for the page tests, driven by Playwright for Python.

Playwright only talks to the browser here: it never downloads one (``playwright install`` is never run and
nothing outside the package mirrors is reachable). The browser is Debian's ``chromium`` package, started as
root in a sandbox-less container, with a fresh profile per :class:`Browser`.

JavaScript errors and failed console messages are collected in :attr:`Browser.errors`, so a test can assert
that its page ran cleanly.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from playwright.sync_api import ConsoleMessage, Error, Page, Playwright, ViewportSize, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
# Root in a container has no user namespaces for the sandbox; the rest keep the browser quiet and offline.
FLAGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}  # the size of the screenshots in docs/img


class Browser:
    """One headless Chromium with its own profile in ``profile`` (a fresh, empty directory)."""

    def __init__(self, profile: Path, *, beside: Browser | None = None, ignore_https_errors: bool = False) -> None:
        """``beside``: a second browser (its own profile and cookies) on the first one's Playwright, which
        allows only one driver per thread. ``ignore_https_errors``: accept a test's self-signed certificate."""
        if not CHROMIUM.exists():
            # Fail, never skip: the page tests are part of what the sidecar must show.
            raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium")
        self.errors: list[str] = []
        self._owner = beside is None
        self._playwright: Playwright = sync_playwright().start() if beside is None else beside._playwright
        try:
            # A persistent context is the way to hand Chromium our own --user-data-dir.
            self.context = self._playwright.chromium.launch_persistent_context(
                str(profile), executable_path=str(CHROMIUM), headless=True, chromium_sandbox=False, args=FLAGS,
                viewport=VIEWPORT, locale="en-GB", timezone_id="Europe/London", ignore_https_errors=ignore_https_errors)
        except Error:
            if self._owner:
                self._playwright.stop()
            raise

    def page(self) -> Page:
        page = self.context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(f"{page.url}: {exc}"))
        page.on("console", lambda msg: self._console(page, msg))
        return page

    def _console(self, page: Page, message: ConsoleMessage) -> None:
        # A missing camera thumbnail is a 404 the page handles on purpose; anything else is a real error.
        if message.type == "error" and "thumbnail.jpg" not in (message.location.get("url") or ""):
            self.errors.append(f"{page.url}: {message.text} ({message.location.get('url')})")

    def close(self) -> None:
        try:
            self.context.close()
        finally:
            if self._owner:
                self._playwright.stop()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def log_in(page: Page, url: str, name: str, password: str) -> None:
    """Open ``url``, which sends a browser without a session to the login page; log in there and come back."""
    page.goto(url)
    if "/login" not in page.url:
        raise AssertionError(f"{url} did not ask for a login (at {page.url})")
    page.fill("#name", name)
    page.fill("#password", password)
    with page.expect_navigation():
        page.click("#login")
    if "/login" in page.url:
        message = page.locator("#login-message").text_content() if page.locator("#login-message").count() else ""
        raise AssertionError(f"the login as {name} failed: {message}")
