"""The rendezvous' phone page: form with the device status, HTML results for the page's own
form posts, a warning when the OTP was already used, and a photo upload (aiohttp, no browser)."""
from __future__ import annotations

import json

import aiohttp

from images import png_grey, qr_pixels, transform

TTE = "/.well-known/tte"
BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


def _form(s, dev, **over) -> dict:
    d = {"otp": dev.label.otp, "devid": dev.label.devid, "page": "1", "cip": "127.0.0.1",
         "cport": str(s.gw_port), "cfingerprint": s.fleet.owner_fp_hex}
    d.update(over)
    return d


async def test_page_is_phone_sized_prefilled_and_shows_the_status(sq_servers):
    s = sq_servers
    dev = await s.fleet.make(claim=False, inventory=False)
    status, headers, body = await s.request("GET", dev.label.url.replace("https://127.0.0.1:8443", s.rv_url),
                                            headers=BROWSER)
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert 'name="cport" required inputmode="numeric"' in page and 'value="8444"' in page
    assert 'font-size:1.2rem' in page and "min-height:3rem" in page
    assert '<b id="status">not_mapped</b>' in page and 'id="warning"' not in page
    assert 'enctype="multipart/form-data"' in page and 'name="photo"' in page


async def test_form_post_gives_an_html_result_then_the_already_used_warning(sq_servers):
    s = sq_servers
    dev = await s.fleet.make(claim=False, inventory=False)
    status, headers, body = await s.request("POST", f"{s.rv_url}{TTE}", data=_form(s, dev))
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "Device claimed" in body.decode() and dev.urn in body.decode()
    # the thief's (or a second) post of the same label
    status, headers, body = await s.request("POST", f"{s.rv_url}{TTE}",
                                            data=_form(s, dev, cip="198.51.100.66"))
    assert status == 409 and headers["Content-Type"].startswith("text/html")
    assert "OTP already used" in body.decode() and "stolen OTP" in body.decode()
    # the page itself now shows the status and the warning
    _st, _h, body = await s.request("GET", f"{s.rv_url}{TTE}", headers=BROWSER,
                                    params={"otp": dev.label.otp, "devid": dev.label.devid})
    assert '<b id="status">mapped</b>' in body.decode() and 'id="warning"' in body.decode()
    # scripts posting JSON still get JSON
    status, headers, body = await s.request(
        "POST", f"{s.rv_url}{TTE}", params={"otp": dev.label.otp, "devid": dev.label.devid},
        json={"cip": "127.0.0.1", "cport": s.gw_port, "cfingerprint": s.fleet.owner_fp_hex})
    assert status == 409 and json.loads(body)["error"] == "conflict"


async def test_user_data_is_escaped_on_every_page(sq_servers):
    s = sq_servers
    dev = await s.fleet.make(claim=False, inventory=False)
    evil = '"><script>alert(1)</script>'
    status, _h, body = await s.request("POST", f"{s.rv_url}{TTE}", data=_form(s, dev, cip=evil))
    assert status == 400 and b"<script>alert" not in body and b"Not claimed" in body
    status, _h, body = await s.request("POST", f"{s.rv_url}{TTE}", data=_form(s, dev, cport=evil))
    assert status == 400 and b"<script>alert" not in body
    status, _h, body = await s.request("GET", f"{s.rv_url}{TTE}", headers=BROWSER,
                                       params={"otp": "<b>x</b>", "devid": "<i>"})
    assert b"<b>x</b>" not in body and b"&lt;b&gt;x&lt;/b&gt;" in body


def _upload(png: bytes) -> aiohttp.FormData:
    fd = aiohttp.FormData()
    fd.add_field("photo", png, filename="label.png", content_type="image/png")
    return fd


async def test_photo_upload_renders_the_claim_form_for_that_label(sq_servers):
    s = sq_servers
    dev = await s.fleet.make(claim=False, inventory=False)
    url = dev.label.url.replace("https://127.0.0.1:8443", s.rv_url)
    png = png_grey(transform(qr_pixels(url, scale=5)[2], angle_deg=12, noise=30))
    before = await s.store.rendezvous.get(dev.serial)
    status, headers, body = await s.request("POST", f"{s.rv_url}{TTE}", data=_upload(png), headers=BROWSER)
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html"), page
    assert f'name="otp" value="{dev.label.otp}"' in page and f'name="devid" value="{dev.label.devid}"' in page
    assert '<b id="status">not_mapped</b>' in page
    assert (await s.store.rendezvous.get(dev.serial)).status == before.status   # nothing claimed
    # a script gets the label URL as JSON
    status, _h, body = await s.request("POST", f"{s.rv_url}{TTE}", data=_upload(png),
                                       headers={"Accept": "application/json"})
    assert status == 200 and json.loads(body) == {"label_url": url}


async def test_photo_of_another_rendezvous_label_links_there(sq_servers):
    s = sq_servers
    other = "https://tte-00000a.net/.well-known/tte?otp=0011223344556677&devid=a1b2c3d4"
    status, _h, body = await s.request("POST", f"{s.rv_url}{TTE}", headers=BROWSER,
                                       data=_upload(png_grey(qr_pixels(other, scale=5)[2])))
    assert status == 200 and b"another rendezvous" in body and b'href="https://tte-00000a.net' in body
    assert b'name="cip"' not in body


async def test_photo_without_a_code_is_a_readable_error(sq_servers):
    s = sq_servers
    blank = png_grey([[255] * 64 for _ in range(64)])
    status, headers, body = await s.request("POST", f"{s.rv_url}{TTE}", data=_upload(blank), headers=BROWSER)
    assert status == 400 and headers["Content-Type"].startswith("text/html") and b"no QR code" in body
    status, headers, body = await s.request("POST", f"{s.rv_url}{TTE}", data=_upload(blank))
    assert status == 400 and json.loads(body)["error"] == "bad_photo"
    # a code whose text is markup is not echoed raw
    status, _h, body = await s.request("POST", f"{s.rv_url}{TTE}", headers=BROWSER,
                                       data=_upload(png_grey(qr_pixels("<script>alert(1)</script>", scale=5)[2])))
    assert status == 400 and b"<script>alert" not in body
