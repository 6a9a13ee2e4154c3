"""The sampling page: every refusal is a clear 4xx JSON message, generation writes what it reports,
and a real headless Chromium can type a prompt, generate, and see the images with their settings."""

import io
import json
import shutil
import socket
import threading
import time
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tagdit.config import SamplerConfig
from tagdit.web.app import create_app
from tasks.records import painter_for_run
from tests.numerics import assert_images_close
from tests.run_fixtures import sample_args

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"prompt": "smile, hat", "steps": "2", "n": "2", "seed": "7"}


@pytest.fixture(scope="module")
def app(tiny_run, tmp_path_factory):
    return create_app(painter_for_run(tiny_run), tmp_path_factory.mktemp("web") / "samples-web")


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def png(size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, "white" if mode == "RGB" else 1).save(buf, "PNG")
    return buf.getvalue()


def post(client, fields=None, file=None, **kw):
    files = {"init_image": file} if file else None
    return client.post("/api/generate", data={**FAST, **(fields or {})}, files=files, **kw)


def test_the_page_and_the_run_info_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="prompt"' in page.text and 'id="generate"' in page.text
    info = client.get("/api/info").json()
    assert info["resolution"] == 64 and info["tags"] == 6 and info["limits"]["n"] == 16


@pytest.mark.parametrize("prefix, tags", [("h", ["hat", "red hair", "blue hair"]), ("Blue_H", ["blue hair"]),
                                          ("^_", ["^_^"]), ("zzz", [])])
def test_completion_offers_prefix_matches_first_then_inner_ones(client, prefix, tags):
    assert client.get("/api/tags", params={"prefix": prefix}).json() == {"tags": tags}


def test_completion_limit_is_checked(client):
    assert client.get("/api/tags", params={"limit": 2}).json()["tags"] == ["red hair", "blue hair"]
    r = client.get("/api/tags", params={"limit": 0})
    assert r.status_code == 422 and "limit" in r.json()["error"]


def test_generation_writes_the_images_it_reports_each_from_its_own_seed(client, app):
    r = post(client)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [i["seed"] for i in body["images"]] == [7, 8]
    first = body["images"][0]
    assert first["prompt"] == "smile, hat" and first["steps"] == 2 and first["sampler"] == "ddim" and first["eta"] == 0
    got = [Image.open(io.BytesIO(client.get(i["url"]).content)) for i in body["images"]]
    assert got[0].size == (64, 64) and json.loads(got[0].text["parameters"])["seed"] == 7
    painter = app.state.studio.painter
    cond, neg = painter.parse("smile, hat")[0], painter.parse("")[0]
    alone = painter.sample(cond, neg, SamplerConfig(name="t", steps=2), 4.0, 8, 1)[0]
    assert_images_close(got[1].convert("RGB"), alone)  # image 1 = seed 8 alone (a batch of 2 vs 1)
    with zipfile.ZipFile(io.BytesIO(client.get(body["zip"]).content)) as z:
        assert sorted(z.namelist()) == sorted([i["file"] for i in body["images"]] + ["settings.json"])
    assert sorted(p.name for p in app.state.studio.out_dir.iterdir()) == sorted(
        [i["file"] for i in body["images"]] + [body["zip"].split("/")[-1]])


def test_img2img_at_strength_zero_returns_the_vae_round_trip(client, app):
    r = post(client, {"strength": "0", "n": "1"}, file=("../../evil name.png", png(), "image/png"))
    assert r.status_code == 200, r.text
    record = r.json()["images"][0]
    assert record["strength"] == 0 and record["init_image"] == "evil name.png"
    painter = app.state.studio.painter
    want = painter.decode(painter.encode_image(Image.open(io.BytesIO(png()))))[0]
    got = Image.open(io.BytesIO(client.get(record["url"]).content)).convert("RGB")
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert all(p.parent == app.state.studio.out_dir for p in app.state.studio.out_dir.rglob("*"))


@pytest.mark.parametrize("fields, message", [
    ({"n": "17"}, "n: Input should be less than or equal to 16"),
    ({"n": "0"}, "n: Input should be greater than or equal to 1"),
    ({"steps": "1001"}, "steps: Input should be less than or equal to 1000"),
    ({"steps": "many"}, "steps: Input should be a valid integer"),
    ({"cfg": "31"}, "cfg: Input should be less than or equal to 30"),
    ({"cfg": "nan"}, "cfg: Input should be a finite number"),
    ({"strength": "1.5"}, "strength: Input should be less than or equal to 1"),
    ({"eta": "-0.1"}, "eta: Input should be greater than or equal to 0"),
    ({"seed": "-1"}, "seed: Input should be greater than or equal to 0"),
    ({"sampler": "euler"}, "sampler: Input should be 'ddim' or 'dpmpp_2m'"),
    ({"sampler": "dpmpp_2m", "eta": "0.5"}, "eta applies to the ddim sampler only"),
    ({"steps_typo": "3"}, "steps_typo: Extra inputs are not permitted"),
    ({"prompt": "smile, " * 400}, "prompt: String should have at most 2000 characters"),
])
def test_out_of_range_settings_are_refused_with_the_field_named(client, fields, message):
    r = post(client, fields)
    assert r.status_code == 422 and message in r.json()["error"], r.text


def test_sampler_limits_below_the_form_limit_are_reported(client):
    r = post(client, {"sampler": "dpmpp_2m", "steps": "1000", "n": "1"})
    assert r.status_code == 422 and "steps must be in [1, 999]" in r.json()["error"]


def test_unknown_tags_are_refused_and_listed_with_suggestions(client):
    r = post(client, {"prompt": "smil, purple_cape", "negative": "hats"})
    assert r.status_code == 422
    body = r.json()
    assert body["unknown_tags"] == ["smil", "purple_cape", "hats"]
    assert "smil (did you mean: smile?)" in body["error"] and "hats (did you mean: hat" in body["error"]


@pytest.mark.parametrize("file, status, message", [
    (("x.png", b"\x89PNG\r\n\x1a\nbroken", "image/png"), 422, "not a readable image"),
    (("x.txt", b"hello", "text/plain"), 422, "not a readable image"),
    (("x.png", b"", "image/png"), 422, "the init image file is empty"),
    (("wide.png", png((5000, 8), "1"), "image/png"), 422, "at most 4096x4096"),
    (("bomb.png", png((4096 * 4, 4096 * 4), "1"), "image/png"), 422, "at most 4096x4096"),  # ~8 kB, 268 Mpx
    (("big.png", b"\0" * (10 * 2**20 + 1), "image/png"), 413, "at most 10 MB"),
])
def test_bad_uploads_are_refused_with_a_message(client, file, status, message):
    r = post(client, file=file)
    assert r.status_code == status and message in r.json()["error"], r.text


def test_an_oversized_body_is_refused_while_it_streams(client):
    sent = []

    def chunks():
        for _ in range(40):
            sent.append(1)
            yield b"\0" * 2**20

    r = client.post("/api/generate", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "too large" in r.json()["error"]
    r = client.post("/api/generate", content=b"x", headers={"content-type": "multipart/form-data; boundary=b",
                                                              "content-length": str(11 * 2**20)})
    assert r.status_code == 413


@pytest.mark.parametrize("kwargs, status, message", [
    ({"json": {"prompt": "smile"}}, 415, "multipart/form-data"),
    ({"content": b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n",
      "headers": {"content-type": "multipart/form-data; boundary=b"}}, 400, ""),
])
def test_a_malformed_request_gets_a_message_not_a_trace(client, kwargs, status, message):
    r = client.post("/api/generate", **kwargs)
    assert r.status_code == status and message in r.json()["error"] and "Traceback" not in r.text


@pytest.mark.parametrize("name", ["..%2F..%2Fetc%2Fpasswd", "20240101-000000-deadbeef-0.png", "x.png", "%2Fetc%2Fhosts"])
def test_only_generated_files_are_served(client, name):
    r = client.get(f"/samples/{name}")
    assert r.status_code == 404 and "error" in r.json()


def test_a_crash_while_drawing_is_a_500_without_a_trace(client, app, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(app.state.studio.painter, "sample", boom)
    r = post(client)
    assert r.status_code == 500 and "RuntimeError" in r.json()["error"]
    assert "secret internals" not in r.text and "Traceback" not in r.text


def test_one_generation_at_a_time_while_the_api_stays_responsive(client, app, monkeypatch):
    studio, active, peak, gate = app.state.studio, [0], [0], threading.Event()
    real = studio.painter.sample

    def slow(*a, **k):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        gate.wait(10)
        time.sleep(0.2)
        active[0] -= 1
        return real(*a, **k)

    monkeypatch.setattr(studio.painter, "sample", slow)
    results = []
    workers = [threading.Thread(target=lambda: results.append(post(client, {"n": "1"}).status_code)) for _ in range(2)]
    for w in workers:
        w.start()
    t0 = time.perf_counter()
    while active[0] == 0 and time.perf_counter() - t0 < 10:
        time.sleep(0.01)
    assert client.get("/api/tags", params={"prefix": "s"}).json() == {"tags": ["smile", "glasses"]}  # while drawing
    gate.set()
    for w in workers:
        w.join(30)
    assert results == [200, 200] and peak[0] == 1


def test_serve_command_loads_the_run_once_and_listens_on_localhost(tiny_run, monkeypatch):
    import uvicorn

    from flows import serve

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    serve.main(sample_args(tiny_run, "--port", "9999"))
    assert seen["host"] == "127.0.0.1" and seen["port"] == 9999
    studio = seen["app"].state.studio
    assert studio.out_dir == tiny_run.run_dir / "samples-web" and studio.painter.checkpoint.name == "ckpt-0000004"


# ---------------------------------------------------------------- the page in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(app):
    """The app under a real uvicorn server on a free 127.0.0.1 port: its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    while not server.started and time.perf_counter() - t0 < 20:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{server.config.port}/"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs chromium and chromedriver (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def test_the_page_draws_in_a_headless_browser(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(served)
    wait.until(lambda d: "6 tags" in d.find_element(By.ID, "run").text)
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("red hair, sm")
    options = lambda d: [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#prompt-tags option")]  # noqa: E731
    wait.until(lambda d: options(d) == ["red hair, smile"])
    browser.find_element(By.ID, "n").clear()
    browser.find_element(By.ID, "n").send_keys("17")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: "n: Input should be less than or equal to 16" in d.find_element(By.ID, "message").text)
    assert browser.find_element(By.ID, "message").get_attribute("class") == "error"
    browser.save_screenshot(str(tmp_path / "refused.png"))
    prompt.clear()
    prompt.send_keys("red hair, smile")
    for field, value in (("n", "3"), ("steps", "3"), ("seed", "11")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "generate").click()
    loaded = "return [...document.querySelectorAll('figure.sample img')].filter(i => i.naturalWidth === 64).length"
    wait.until(lambda d: d.execute_script(loaded) == 3)
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "figure.sample figcaption")]
    assert captions[0].startswith("seed 11 · ddim 3 steps · cfg 4 · eta 0") and captions[2].startswith("seed 13")
    assert browser.find_element(By.ID, "message").text == ""
    assert "red hair, smile" in browser.find_element(By.CSS_SELECTOR, ".batch h2").text
    assert browser.find_element(By.CSS_SELECTOR, "a.zip").get_attribute("href").endswith(".zip")
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert Image.open(tmp_path / "page.png").size[0] > 0
