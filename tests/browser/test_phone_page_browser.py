"""The rendezvous' phone page in a real browser: headless Chromium (Debian `chromium`) driven by
Playwright at phone size (390x844 CSS px, device scale 3, touch), against the real rendezvous app
on a loopback TLS socket (tests/transport/http_harness.py).

Each step is saved as a PNG under the test's tmp dir; with ZT_UPDATE_SCREENSHOTS=1 also copied
to docs/screenshots/ (committed, so people can see the page).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlencode

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "transport"))

from http_harness import start_servers  # noqa: E402
from support import need  # noqa: E402
from zerotouch.pki.ca import load_der_cert  # noqa: E402
from zerotouch.pki.keys import cert_fingerprint  # noqa: E402
from zerotouch.storage.base import RendezvousStatus  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 # without these Chromium phones home, and a closed network refuses it
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 3, "is_mobile": True,
         "has_touch": True}
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
TAP_MIN = 44   # px: the smallest comfortable touch target (Apple HIG; WCAG 2.5.5 asks 44 too)
TTE = "/.well-known/tte"


@pytest.fixture
async def servers(tmp_path, sqlite_url):
    s = await start_servers(tmp_path, sqlite_url)
    # Labels printed for *this* rendezvous socket, so the photo of a label is read as ours.
    s.fleet.info = dataclasses.replace(s.fleet.info, url=s.rv_url)
    yield s
    await s.close()


@pytest.fixture
async def phone(tmp_path):
    """A fresh phone-sized page; `dialogs` collects every alert/confirm/prompt a script opened."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        need("Chromium and Playwright", "apt-get install chromium; pip install playwright")
    if not os.access(CHROMIUM, os.X_OK):
        need("Chromium and Playwright", "apt-get install chromium; pip install playwright")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = await browser.new_context(**PHONE, ignore_https_errors=True)
        page = await context.new_page()
        page.set_default_timeout(8000)
        page.dialogs = []

        def on_dialog(dialog):
            page.dialogs.append(dialog.message)
            asyncio.ensure_future(dialog.dismiss())

        page.on("dialog", on_dialog)
        page.shot_dir = tmp_path / "screenshots"
        page.shot_dir.mkdir()
        try:
            yield page
        finally:
            await context.close()
            await browser.close()


async def shot(page, name: str) -> Path:
    path = page.shot_dir / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    if os.environ.get("ZT_UPDATE_SCREENSHOTS"):  # refresh the committed ones in docs/screenshots
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SHOTS / path.name)
    return path


async def assert_tappable(page) -> None:
    """Every visible input and button is at least TAP_MIN CSS px high and fits the screen."""
    controls = page.locator("input:not([type=hidden]), button")
    assert await controls.count() >= 5    # address, port, fingerprint, claim; photo, read label
    for i in range(await controls.count()):
        box = await controls.nth(i).bounding_box()
        name = await controls.nth(i).evaluate("e => e.name || e.textContent")
        assert box is not None, name
        assert box["height"] >= TAP_MIN, (name, box)
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["viewport"]["width"], (name, box)


async def fill_claim(page, s, *, cip: str = "127.0.0.1") -> None:
    await page.fill("input[name=cip]", cip)
    await page.fill("input[name=cport]", str(s.gw_port))
    await page.fill("input[name=cfingerprint]", s.fleet.owner_fp_hex)


async def test_claim_from_the_label_page_then_the_already_used_warning(servers, phone):
    s, page = servers, phone
    dev = await s.fleet.make(claim=False, inventory=False)
    assert dev.label.url.startswith(s.rv_url + TTE)

    resp = await page.goto(dev.label.url)
    assert resp.status == 200
    assert await page.inner_text("h1") == f"Claim device {dev.label.devid}"
    assert await page.inner_text("#status") == "not_mapped"
    assert "not claimed yet" in await page.inner_text("p.status")
    assert await page.locator("#warning").count() == 0
    assert await page.input_value("input[name=cport]") == "8444"
    assert await page.input_value("input[name=otp]") == dev.label.otp
    # the page fits the phone: no horizontal scrolling
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["viewport"]["width"]
    await assert_tappable(page)
    # the photo section's heading is not louder than the page's title
    sizes = await page.evaluate("['h1', 'h2'].map(t => parseFloat(getComputedStyle("
                                "document.querySelector(t)).fontSize))")
    assert sizes[1] < sizes[0], sizes
    await shot(page, "01-claim-form")

    await fill_claim(page, s)
    await shot(page, "02-claim-form-filled")
    async with page.expect_navigation():
        await page.tap("form[method=post]:not([enctype]) button[type=submit]")
    assert await page.inner_text("h1") == "Device claimed"
    rec = await s.store.rendezvous.get(dev.serial)
    assert await page.inner_text("#urn") == dev.urn
    assert await page.inner_text("#fingerprint") == cert_fingerprint(load_der_cert(rec.idevid_der)).hex()
    assert rec.status == RendezvousStatus.MAPPED
    assert rec.owner_fp == bytes.fromhex(s.fleet.owner_fp_hex)
    assert rec.gateway_url == f"https://127.0.0.1:{s.gw_port}"
    await shot(page, "03-claimed")

    # The same label again (a second claim, or a thief with a copy of the label)
    await page.goto(dev.label.url)
    assert await page.inner_text("#status") == "mapped"
    assert await page.locator("#warning").is_visible()
    assert "stolen OTP" in await page.inner_text("#warning")
    await shot(page, "04-label-already-claimed")
    await fill_claim(page, s, cip="198.51.100.66")
    async with page.expect_navigation() as nav:
        await page.tap("form[method=post]:not([enctype]) button[type=submit]")
    assert (await nav.value).status == 409
    assert await page.inner_text("h1") == "OTP already used"
    assert "stolen OTP" in await page.inner_text("#message")
    assert await page.locator("p.warn").is_visible()
    await shot(page, "05-otp-already-used")
    after = await s.store.rendezvous.get(dev.serial)
    assert (after.status, after.gateway_url, after.owner_fp, after.claimed_at) == \
        (rec.status, rec.gateway_url, rec.owner_fp, rec.claimed_at)          # first mapping intact
    assert page.dialogs == []


async def test_photo_of_the_label_opens_its_claim_form(servers, phone):
    s, page = servers, phone
    first = await s.fleet.make(claim=False, inventory=False)    # the page we start on
    dev = await s.fleet.make(claim=False, inventory=False)      # the one photographed
    png = s.fleet.tmp / "factory" / "labels" / f"{dev.label.devid}.png"
    assert png.is_file()                                          # the manufacturer's label PNG

    await page.goto(first.label.url)
    await page.set_input_files("input[name=photo]", str(png))
    await shot(page, "06-photo-chosen")
    async with page.expect_navigation() as nav:
        await page.tap("form[enctype='multipart/form-data'] button[type=submit]")
    assert (await nav.value).status == 200
    assert await page.inner_text("h1") == f"Claim device {dev.label.devid}"
    assert await page.input_value("input[name=otp]") == dev.label.otp
    assert await page.input_value("input[name=devid]") == dev.label.devid
    assert await page.inner_text("#status") == "not_mapped"
    assert (await s.store.rendezvous.get(dev.serial)).status == RendezvousStatus.NOT_MAPPED
    await assert_tappable(page)
    await shot(page, "07-claim-form-from-photo")

    # and the form the photo gave claims that device (not the one the page was opened for)
    await fill_claim(page, s)
    async with page.expect_navigation():
        await page.tap("form[method=post]:not([enctype]) button[type=submit]")
    assert await page.inner_text("#urn") == dev.urn
    assert (await s.store.rendezvous.get(dev.serial)).status == RendezvousStatus.MAPPED
    assert (await s.store.rendezvous.get(first.serial)).status == RendezvousStatus.NOT_MAPPED
    assert page.dialogs == []


async def test_markup_in_the_label_or_the_form_never_runs(servers, phone):
    s, page = servers, phone
    marker = "window.__xss=1"
    await page.add_init_script("window.__xss = 0")
    # within the length limits, so the form page itself renders them
    otp, devid = "<script>alert(1)</script>", "<svg/onload=d()>"
    resp = await page.goto(f"{s.rv_url}{TTE}?{urlencode({'otp': otp, 'devid': devid})}")
    assert resp.status == 200
    assert await page.inner_text("h1") == f"Claim device {devid}"     # shown as text
    assert await page.input_value("input[name=otp]") == otp
    assert await page.locator("body script, body svg").count() == 0
    assert "cannot be checked" in await page.inner_text("#status-error")
    await shot(page, "08-markup-in-label-shown-as-text")

    # through the form: a controller address that is markup comes back escaped in the error
    evil = f"\"><img src=x onerror=\"alert(3);{marker}\">"
    dev = await s.fleet.make(claim=False, inventory=False)
    await page.goto(dev.label.url)
    await fill_claim(page, s, cip=evil)
    async with page.expect_navigation() as nav:
        await page.tap("form[method=post]:not([enctype]) button[type=submit]")
    assert (await nav.value).status == 400
    assert await page.inner_text("h1") == "Not claimed"
    assert await page.locator("img").count() == 0
    await asyncio.sleep(0.2)       # an onerror would have fired by now
    assert await page.evaluate("window.__xss") == 0
    await shot(page, "09-markup-in-form-refused")
    assert (await s.store.rendezvous.get(dev.serial)).status == RendezvousStatus.NOT_MAPPED

    # a long query is refused before any page is built
    resp = await page.goto(f"{s.rv_url}{TTE}?{urlencode({'otp': '<img src=x onerror=alert(4)>' * 2})}")
    assert resp.status == 400 and await page.locator("img").count() == 0

    await asyncio.sleep(0.2)       # an onerror/onload would have fired by now
    assert page.dialogs == []
    assert await page.evaluate("window.__xss") == 0


async def test_claim_with_the_gateway_edhoc_fingerprint(servers, phone):
    """The optional field goes to the claim as `cedhoc`: stored, and signed into the redirect."""
    s, page = servers, phone
    dev = await s.fleet.make(claim=False, inventory=False)
    await page.goto(dev.label.url)
    field = page.locator("input[name=cedhoc]")
    assert await field.is_visible() and not await field.evaluate("e => e.required")
    assert "CoAP with EDHOC" in await page.inner_text("#cedhoc-help")
    await assert_tappable(page)

    # the browser itself refuses what cannot be a fingerprint, and nothing is sent
    await fill_claim(page, s)
    await page.fill("input[name=cedhoc]", "not a fingerprint")
    assert await field.evaluate("e => e.checkValidity()") is False
    await page.tap("form[method=post]:not([enctype]) button[type=submit]")
    assert await page.inner_text("h1") == f"Claim device {dev.label.devid}"
    # what passes the browser's pattern but is not 64 digits: the rendezvous says why
    await page.fill("input[name=cedhoc]", "ab" * 32 + "c")
    async with page.expect_navigation() as nav:
        await page.tap("form[method=post]:not([enctype]) button[type=submit]")
    assert (await nav.value).status == 400
    assert await page.inner_text("h1") == "Not claimed"
    message = await page.inner_text("#message")
    assert "EDHOC key fingerprint" in message and "64 hex digits" in message
    await shot(page, "10-bad-edhoc-fingerprint")
    assert (await s.store.rendezvous.get(dev.serial)).status == RendezvousStatus.NOT_MAPPED

    # a right one (with colons and capitals, as people copy them) claims the device
    fp = bytes(range(32))
    await page.goto(dev.label.url)
    await fill_claim(page, s)
    await page.fill("input[name=cedhoc]", ":".join(f"{b:02X}" for b in fp))
    await shot(page, "11-claim-form-with-edhoc")
    async with page.expect_navigation():
        await page.tap("form[method=post]:not([enctype]) button[type=submit]")
    assert await page.inner_text("h1") == "Device claimed"
    rec = await s.store.rendezvous.get(dev.serial)
    assert rec.status == RendezvousStatus.MAPPED and rec.gateway_edhoc_fp == fp
    # and the device's signed redirect names that key
    core = s.fleet.core(dev)
    redirect = core.receive_redirect(await s.fleet.rendezvous.find_owner(core.find_owner_request()))
    assert redirect.gateway_edhoc_fp == fp
    assert page.dialogs == []


async def test_psk_device_claimed_with_its_rendezvous_key_never_shown_again(servers, phone):
    """A PSK-profile device: the page's optional K_rv field (a password field) carries cpsk;
    a wrong key gets a page saying so (nothing stored), the right one claims; neither is shown."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "psk"))
    from psk_support import PskFleet
    from zerotouch.identity.psk import PskIdentity
    from zerotouch.protocol.psk import rendezvous_key
    s, page = servers, phone
    pskf = PskFleet(s.fleet)
    dev = await pskf.make(claim=False, inventory=False, gateway_psk=False)
    k_rv = rendezvous_key(PskIdentity(dev.device_dir).psk(), dev.serial).hex()
    wrong = "5a" * 32
    await page.goto(dev.label.url.replace("https://127.0.0.1:8443", s.rv_url))
    field = page.locator("input[name=cpsk]")
    assert await field.get_attribute("type") == "password"
    assert await field.get_attribute("autocomplete") == "off"
    await assert_tappable(page)
    await fill_claim(page, s)
    await page.fill("input[name=cpsk]", wrong)
    await shot(page, "10-psk-device-key-filled")
    async with page.expect_navigation() as nav:
        await page.tap("form[method=post]:not([enctype]) button[type=submit]")
    assert (await nav.value).status == 403
    assert await page.inner_text("h1") == "Not claimed"
    assert "cpsk is not this device's rendezvous key" in await page.inner_text("#message")
    assert wrong not in await page.content()
    assert (await s.store.rendezvous.get(dev.serial)).status == RendezvousStatus.NOT_MAPPED
    await shot(page, "11-psk-device-wrong-key")

    await page.goto(dev.label.url.replace("https://127.0.0.1:8443", s.rv_url))
    await fill_claim(page, s)
    await page.fill("input[name=cpsk]", k_rv)
    async with page.expect_navigation():
        await page.tap("form[method=post]:not([enctype]) button[type=submit]")
    assert await page.inner_text("h1") == "Device claimed"
    assert k_rv not in (await page.content()).lower()
    assert (await s.store.rendezvous.get(dev.serial)).status == RendezvousStatus.MAPPED
    assert await s.fleet.rendezvous.psk_keys.key(dev.serial) == bytes.fromhex(k_rv)
