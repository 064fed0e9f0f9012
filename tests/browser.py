"""Helpers for the Playwright browser tests: Debian's Chromium, file drops, screenshots, page checks,
and the ``browser`` and ``open_page`` fixtures (tests/conftest.py offers them to every test module)."""

import base64
import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1100, "height": 700}
TIMEOUT_MS = 15_000
SCREENSHOTS = ROOT / "test-output" / "screenshots"
DOCS_SCREENSHOTS = ROOT / "docs" / "screenshots"
DOCS_MAX_BYTES = 150 * 1024


def launch(playwright: Playwright) -> Browser:
    # Playwright's own browser download needs the internet; the system Chromium does not.
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def watch_for_errors(page: Page) -> list[str]:
    """Collects uncaught script errors and console errors (failed requests included) of a page."""
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"{page.url}: uncaught {error}"))
    page.on("console", lambda msg: errors.append(f"{page.url}: console {msg.text}") if msg.type == "error" else None)
    return errors


def log_in(page: Page, username: str, password: str) -> None:
    """Signs in through the login form the way a person does (the dashboard redirects there)."""
    page.goto("/")
    assert "/accounts/login/" in page.url
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/accounts/login/" not in url)


def drop_files(
    page: Page, selector: str, files: list[Path | tuple[str, bytes]], content_type="image/png", check_highlight=True
) -> None:
    """A real drag and drop: a DataTransfer holding File objects (from paths or (name, bytes) pairs),
    dispatched as dragenter, dragover and drop on the element (which highlights while dragged over,
    unless it is not taking files)."""
    pairs = [(f.name, f.read_bytes()) if isinstance(f, Path) else f for f in files]
    files = [{"name": name, "type": content_type, "data": base64.b64encode(data).decode()} for name, data in pairs]
    transfer = page.evaluate_handle(
        """(files) => {
            const transfer = new DataTransfer();
            for (const f of files) {
                const bytes = Uint8Array.from(atob(f.data), (c) => c.charCodeAt(0));
                transfer.items.add(new File([bytes], f.name, { type: f.type }));
            }
            return transfer;
        }""",
        files,
    )
    page.dispatch_event(selector, "dragenter", {"dataTransfer": transfer})
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    over = page.eval_on_selector(selector, "(el) => el.classList.contains('over')")
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})
    assert over or not check_highlight, "the drop zone did not highlight while files were dragged over it"
    transfer.dispose()


def broken_images(page: Page) -> list[str]:
    """Sources of the page's images that failed to load (waits for pending ones first)."""
    page.wait_for_function("Array.from(document.images).every((img) => img.complete)")
    return page.evaluate("Array.from(document.images).filter((img) => img.naturalWidth === 0).map((img) => img.src)")


def overflows_horizontally(page: Page) -> bool:
    """Whether the page is wider than the window (a sideways scroll on a tablet)."""
    return page.evaluate("document.documentElement.scrollWidth > document.documentElement.clientWidth")


def screenshot(page: Page, name: str, *, docs: bool = False) -> Path:
    """Saves a full-page screenshot under test-output/screenshots/. With ``docs``, and only when
    asked with UPDATE_DOCS_SCREENSHOTS=1, also the viewport as docs/screenshots/<name>.png for the
    README: a test run otherwise writes nothing into the committed tree, a missing image included."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if docs and os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        (DOCS_SCREENSHOTS / f"{name}.png").write_bytes(small_png(page.screenshot()))
    return path


def small_png(data: bytes, limit: int = DOCS_MAX_BYTES) -> bytes:
    """The screenshot as PNG, reduced to a 256-colour palette when it is over ``limit`` bytes."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    for colors in (None, 256, 128, 64):
        converted = image if colors is None else image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
        buffer = io.BytesIO()
        converted.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= limit:
            break
    return buffer.getvalue()


@pytest.fixture(scope="module")
def browser():
    # Playwright's sync API keeps an event loop running in this thread; Django refuses ORM calls
    # from a thread with a running loop unless told it is safe (it is: nothing here is async).
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = launch(playwright)
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


class Pages:
    """Opens pages, each in a fresh browser context (its own cookies, so its own user), and keeps
    every page's script errors and failed requests; the test fails on any that it did not expect."""

    def __init__(self, browser, base_url: str):
        self.browser, self.base_url = browser, base_url
        self.contexts, self.errors = [], {}

    def __call__(self, *, enforce_csp: bool = False):
        # Playwright's waits evaluate strings of script, which the site's Content-Security-Policy
        # forbids; pages are checked under the policy where a test asks for it.
        context = self.browser.new_context(
            base_url=self.base_url, viewport=VIEWPORT, accept_downloads=True, bypass_csp=not enforce_csp
        )
        context.set_default_timeout(TIMEOUT_MS)
        self.contexts.append(context)
        page = context.new_page()
        self.errors[page] = watch_for_errors(page)
        # Intercept file choosers from the start: turned on only by expect_file_chooser(), the
        # interception races with the key press that opens the chooser and loses about half the time.
        page.on("filechooser", lambda chooser: None)
        return page

    def expect_error(self, page, fragment: str) -> None:
        """The page reported an error containing ``fragment`` (waiting for it a while, as for any other expectation)."""
        for _ in range(TIMEOUT_MS // 100):
            if any(fragment in error for error in self.errors[page]):
                break
            page.wait_for_timeout(100)
        matching = [error for error in self.errors[page] if fragment in error]
        assert matching, f"expected an error containing {fragment!r}, got {self.errors[page]}"
        self.errors[page].remove(matching[0])

    def close(self) -> list[str]:
        for context in self.contexts:
            context.close()
        return [error for errors in self.errors.values() for error in errors]


@pytest.fixture
def open_page(browser, live_server):
    pages = Pages(browser, live_server.url)
    yield pages
    problems = pages.close()
    assert not problems, problems
