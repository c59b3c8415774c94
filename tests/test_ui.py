"""The chat UI and admin page in headless Chromium (Debian's), through Envoy, on the real mesh."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from helpers import DEFAULT_MODEL, Mesh, mesh_settings, metric_value, wait_for
from playwright.sync_api import BrowserContext, Page, sync_playwright

from doorman.config import ManifestConfig, PrivacyConfig, RoutingConfig
from slm.v1 import ledger_pb2, ledger_pb2_grpc

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
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
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
LONG_ANSWER = 1500
# The privacy mesh's alias that a router manifest serves: router (intent) -> specialist.
ROUTED = "auto"


@pytest.fixture(scope="module")
def browser_context(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BrowserContext]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 720},
            # The pages' CSP forbids eval, which Playwright's wait_for_function needs.
            bypass_csp=True,
        )
        try:
            yield context
        finally:
            context.close()


class PageProbe:
    """A page plus what went wrong in it: script errors and requests to other origins."""

    def __init__(self, page: Page, base_url: str) -> None:
        self.page = page
        self.errors: list[str] = []
        self.foreign: list[str] = []
        # The chat socket goes to the same host and port, over ws://.
        self._origins = (base_url, base_url.replace("http://", "ws://", 1))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("request", lambda request: self._check(request.url))
        page.on("websocket", lambda socket: self._check(socket.url))

    def _check(self, url: str) -> None:
        if not url.startswith(self._origins):
            self.foreign.append(url)


@pytest.fixture
def probe(browser_context: BrowserContext, mesh: Mesh) -> Iterator[PageProbe]:
    page = browser_context.new_page()
    page.set_default_timeout(120_000)
    yield PageProbe(page, mesh.base_url)
    page.close()


def open_chat(probe: PageProbe, mesh: Mesh) -> Page:
    page = probe.page
    response = page.goto(f"{mesh.base_url}/")
    # The chat page itself: an error answered in its place (Envoy's 503 JSON when no gateway
    # took the connection) has no #model, and is named here rather than as a script error.
    assert response is not None, "no response for the chat page"
    assert response.status == 200, (response.status, response.text())
    # The model list arrives from /v1/models after the page has loaded. A locator waits for the
    # option to exist; the former predicate (`querySelector('#model').value`) threw on any
    # document without #model instead of failing on what the page was, and a throwing
    # predicate ends Playwright's wait at once.
    page.locator(f"#model option[value='{DEFAULT_MODEL}']").wait_for(state="attached")
    page.select_option("#model", DEFAULT_MODEL)
    return page


def engine_cancelled(mesh: Mesh) -> float:
    text = httpx.get(mesh.inference_metrics_url).text
    return metric_value(
        text, "slm_engine_requests_total", model=DEFAULT_MODEL, finish_reason="cancelled"
    )


def test_chat_streams_an_answer_with_its_figures(probe: PageProbe, mesh: Mesh) -> None:
    page = open_chat(probe, mesh)
    page.fill("#system", "You are terse.")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    page.fill("#prompt", "Name three colours.")
    page.click("#send")
    answer = page.locator(".message.assistant").last
    # Streamed: text shows while the answer is still marked as streaming.
    page.wait_for_function(
        "(() => { const m = [...document.querySelectorAll('.message.assistant')].pop();"
        " return m.classList.contains('done') ||"
        " (m.classList.contains('streaming') && m.querySelector('.text').textContent.length > 0);"
        " })()"
    )
    answer.locator(".figures").wait_for()
    page.screenshot(path=str(ARTIFACTS / "ui-chat.png"))
    assert answer.get_attribute("class") is not None
    assert "done" in (answer.get_attribute("class") or "")
    assert answer.locator(".text").inner_text().strip()
    figures = answer.locator(".figures").inner_text()
    assert "tier A · local" in figures
    assert "TTFT" in figures
    assert "tokens" in figures
    assert page.locator("#stop").is_disabled()
    assert probe.errors == []
    assert probe.foreign == []


def test_stop_ends_generation_in_the_engine(probe: PageProbe, mesh: Mesh) -> None:
    page = open_chat(probe, mesh)
    before = engine_cancelled(mesh)
    page.fill("#temperature", "1")
    page.fill("#max_tokens", str(LONG_ANSWER))
    page.fill("#prompt", "Count from one to one thousand: one, two,")
    page.click("#send")
    # Text is arriving: the answer is streaming, so Stop cuts it short.
    page.wait_for_function(
        "document.querySelector('.message.assistant.streaming .text')?.textContent.length > 10"
    )
    assert page.locator("#stop").is_enabled()
    page.click("#stop")
    answer = page.locator(".message.assistant").last
    answer.locator(".figures").wait_for()
    page.screenshot(path=str(ARTIFACTS / "ui-stopped.png"))
    assert "stopped" in (answer.get_attribute("class") or "")
    assert "stopped by you" in answer.locator(".figures").inner_text()
    assert page.locator("#stop").is_disabled()
    assert page.locator("#send").is_enabled()
    # Closing the socket cancelled the call through Envoy, the gateway and the Doorman.
    assert wait_for(lambda: engine_cancelled(mesh) >= before + 1), "the engine never cancelled"
    assert probe.errors == []


@pytest.fixture(scope="module")
def privacy_mesh(model_path: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh whose Doorman masks personal data even for the local tier, and serves ROUTED by
    asking the default model for an intent, then the default model again as the specialist."""
    state = tmp_path_factory.mktemp("ui-privacy-mesh")
    settings = mesh_settings(state)
    manifest = ManifestConfig(
        alias=ROUTED,
        router_model=DEFAULT_MODEL,
        intents={"greeting": DEFAULT_MODEL, "question": DEFAULT_MODEL},
        fallback=DEFAULT_MODEL,
    )
    settings.doorman = settings.doorman.model_copy(
        update={
            "privacy": PrivacyConfig(sanitize_tiers=["local"]),
            "routing": RoutingConfig(manifests=[manifest]),
        }
    )
    mesh = Mesh(settings, state / "slm.toml", state / "mesh.log")
    mesh.start()
    yield mesh
    assert mesh.stop() == 0, mesh.log_tail()


def test_masked_personal_data_is_marked(
    browser_context: BrowserContext, privacy_mesh: Mesh
) -> None:
    probe = PageProbe(browser_context.new_page(), privacy_mesh.base_url)
    probe.page.set_default_timeout(120_000)
    page = open_chat(probe, privacy_mesh)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "16")
    page.fill("#prompt", "Write to jane.doe@example.com and say hello.")
    page.click("#send")
    answer = page.locator(".message.assistant").last
    answer.locator(".figures").wait_for()
    page.screenshot(path=str(ARTIFACTS / "ui-masked.png"))
    mark = answer.locator(".masked")
    assert mark.count() == 1
    assert "EMAIL_ADDRESS \u00d71" in mark.inner_text()
    assert "masked upstream and restored" in mark.inner_text()
    assert "Personal data: 1 item(s)" in mark.inner_text()
    assert probe.errors == []
    probe.page.close()


def test_admin_page_lists_the_newest_records_newest_first(
    browser_context: BrowserContext, privacy_mesh: Mesh
) -> None:
    # More records than the page ever asked for at once (1,000): it must show the chain's tail,
    # not the tail of a page of the oldest.
    address = privacy_mesh.settings.ledger.endpoint.address
    with grpc.insecure_channel(address) as channel:
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        for batch in range(3):
            entries = [
                ledger_pb2.LedgerEntry(request_id=f"ui-{batch}-{i}", tenant="ui", model="m")
                for i in range(400)
            ]
            appended = ledger.AppendBatch(ledger_pb2.AppendBatchRequest(entries=entries))
    head = appended.records[-1].sequence
    probe = PageProbe(browser_context.new_page(), privacy_mesh.base_url)
    page = probe.page
    page.set_default_timeout(120_000)
    page.goto(f"{privacy_mesh.base_url}/admin")
    page.locator("#ledger-table tbody tr").first.wait_for()
    state = page.locator("#ledger-state").inner_text()
    assert state == "20 most recent record(s), newest first"
    shown = [
        int(s) for s in page.locator("#ledger-table tbody tr td:first-child").all_inner_texts()
    ]
    assert shown == list(range(head, head - 20, -1))
    assert probe.errors == []
    page.close()


def test_admin_page_shows_tiers_and_the_routed_requests_live(
    browser_context: BrowserContext, privacy_mesh: Mesh
) -> None:
    probe = PageProbe(browser_context.new_page(), privacy_mesh.base_url)
    page = probe.page
    page.set_default_timeout(120_000)
    page.goto(f"{privacy_mesh.base_url}/admin")
    models = page.locator("#models-table")
    models.locator("tbody tr").first.wait_for()
    headers = models.locator("thead th").all_inner_texts()
    assert headers[:4] == ["name", "tier", "state", "memory"], headers
    row = models.locator("tbody tr", has_text=DEFAULT_MODEL).first
    cells = row.locator("td").all_inner_texts()
    # Configured without a tier and preloaded: loaded, with its weights and context counted.
    assert cells[1] in ("resident", "on_demand"), cells
    assert cells[2] == "ready", cells
    memory, unit = cells[3].split()
    assert (int(memory) > 0, unit) == (True, "MiB"), cells

    # The page is open already: the routed request shows up without a reload.
    reply = httpx.post(
        f"{privacy_mesh.base_url}/v1/chat/completions",
        json={
            "model": ROUTED,
            "messages": [{"role": "user", "content": "Hello there!"}],
            "max_tokens": 4,
            "temperature": 0,
        },
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    newest = page.locator("#requests-table tbody tr").first
    page.wait_for_function(
        "document.querySelector('#requests-table tbody tr td:nth-child(2)')?.textContent"
        f" === '{ROUTED}'"
    )
    _, model, route, tier, ttft, finish = newest.locator("td").all_inner_texts()[:6]
    page.screenshot(path=str(ARTIFACTS / "ui-admin-requests.png"), full_page=True)
    assert model == ROUTED
    router, specialist = route.split(" → ")
    # The router's intent, or "fallback" when it named none.
    assert router in {f"{DEFAULT_MODEL} ({i})" for i in ("greeting", "question", "fallback")}
    assert specialist == DEFAULT_MODEL, route
    assert tier == "local"
    assert int(ttft) >= 0
    assert finish in ("stop", "length")
    # The log carries no prompt text.
    assert "Hello there" not in page.locator("#requests-table").inner_text()
    assert probe.errors == []
    page.close()


def test_admin_page_shows_every_section(probe: PageProbe, mesh: Mesh) -> None:
    page = probe.page
    page.goto(f"{mesh.base_url}/admin")
    page.locator(".metric").first.wait_for()
    sections = (
        "#models-state",
        "#adapters-state",
        "#requests-state",
        "#chain-state",
        "#ledger-state",
    )
    for state in sections:
        page.wait_for_function(f"document.querySelector('{state}').textContent !== ''")
    page.screenshot(path=str(ARTIFACTS / "ui-admin.png"), full_page=True)
    # Each section either shows its data or says plainly that the endpoint is missing.
    for state in sections:
        text = page.locator(state).inner_text()
        assert "Failed" not in text, (state, text)
    assert DEFAULT_MODEL in page.locator("#models-table").inner_text()
    assert "Doorman" in page.locator("#metrics").inner_text()
    assert probe.errors == []
    assert probe.foreign == []


def test_pages_are_self_contained_and_locked_down(mesh: Mesh) -> None:
    for path in ("/", "/admin", "/ui/chat.js", "/ui/style.css"):
        response = httpx.get(f"{mesh.base_url}{path}")
        assert response.status_code == 200, path
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert "http://" not in response.text.replace(mesh.base_url, "")
        assert "https://" not in response.text
    assert httpx.get(f"{mesh.base_url}/ui/missing.js").status_code == 404
    etag = httpx.get(f"{mesh.base_url}/ui/chat.js").headers["etag"]
    cached = httpx.get(f"{mesh.base_url}/ui/chat.js", headers={"if-none-match": etag})
    assert cached.status_code == 304
