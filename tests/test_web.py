"""The sampling page: every refusal is a 4xx JSON message in the page's words (the field's label and
range), generation writes what it reports, a drawing reports its steps and stops when cancelled, the
folder's batches come back after a reload, and a real headless Chromium can use all of it."""

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


@pytest.mark.parametrize("fields, field, message", [
    ({"n": "17"}, "n", "Images must be a whole number from 1 to 16."),
    ({"n": "0"}, "n", "Images must be a whole number from 1 to 16."),
    ({"steps": "1001"}, "steps", "Steps must be a whole number from 1 to 1000."),
    ({"steps": "many"}, "steps", "Steps must be a whole number from 1 to 1000."),
    ({"cfg": "31"}, "cfg", "CFG scale must be a number from 0 to 30."),
    ({"cfg": "nan"}, "cfg", "CFG scale must be a number from 0 to 30."),
    ({"strength": "1.5"}, "strength", "Strength must be a number from 0 to 1."),
    ({"eta": "-0.1"}, "eta", "eta must be a number from 0 to 1."),
    ({"seed": "-1"}, "seed", "Seed must be a whole number from 0 to 2147483647."),
    ({"sampler": "euler"}, "sampler", "Sampler must be one of ddim, ddpm, dpmpp_2m."),
    ({"sampler": "dpmpp_2m", "eta": "0.5"}, "eta", "eta applies to the ddim sampler only; dpmpp_2m fixes its own"),
    ({"steps_typo": "3"}, "steps_typo", "The form sent a field this page does not have: steps_typo."),
    ({"prompt": "smile, " * 400}, "prompt", "Tags must be at most 2000 characters."),
    ({"sampler": "dpmpp_2m", "steps": "1000"}, "steps", "Steps must be a whole number from 1 to 999 for dpmpp_2m."),
    ({"prompt": "red hair, blue hair, smile, hat, glasses"}, "prompt",
     "Tags: has 5 tags; the model reads at most 4 per prompt (remove 1)."),
])
def test_refusals_name_the_field_by_its_label_and_range_in_the_pages_words(client, fields, field, message):
    r = post(client, fields)
    body = r.json()
    assert r.status_code == 422 and list(body["fields"]) == [field] and body["fields"][field].startswith(message), r.text
    assert body["error"] == body["fields"][field] and "Input should" not in r.text and "Value error" not in r.text


def test_every_wrong_field_is_named_at_once_in_the_pages_order(client):
    body = post(client, {"n": "17", "cfg": "-1", "negative": "smil"}).json()
    assert list(body["fields"]) == ["negative", "cfg", "n"] and body["error"] == " ".join(body["fields"].values())


def test_unknown_tags_are_refused_and_listed_with_suggestions(client):
    r = post(client, {"prompt": "smil, purple_cape", "negative": "hats"})
    assert r.status_code == 422
    body = r.json()
    assert body["unknown_tags"] == ["smil", "purple_cape", "hats"] and list(body["fields"]) == ["prompt", "negative"]
    assert body["fields"]["prompt"].startswith("Tags: not in the vocabulary: smil (did you mean: smile?); purple_cape.")
    assert body["fields"]["negative"].startswith("Negative tags: not in the vocabulary: hats (did you mean: hat")


@pytest.mark.parametrize("file, status, message", [
    (("x.png", b"\x89PNG\r\n\x1a\nbroken", "image/png"), 422, "Init image is not an image this page can read"),
    (("x.txt", b"hello", "text/plain"), 422, "Init image is not an image this page can read"),
    (("x.png", b"", "image/png"), 422, "Init image: the file is empty."),
    (("wide.png", png((5000, 8), "1"), "image/png"), 422, "Init image is 5000 × 8 pixels: at most 4096 × 4096"),
    (("bomb.png", png((4096 * 4, 4096 * 4), "1"), "image/png"), 422, "Init image is too large: at most 4096 × 4096"),  # ~8 kB, 268 Mpx
    (("big.png", b"\0" * (10 * 2**20 + 1), "image/png"), 413, "Init image is too large: at most 10 MB"),
])
def test_bad_uploads_are_refused_with_a_message(client, file, status, message):
    r = post(client, file=file)
    assert r.status_code == status and r.json()["fields"]["init_image"].startswith(message), r.text
    assert "BytesIO" not in r.text and " 0x" not in r.text and "Error" not in r.text


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


@pytest.fixture
def gated(app, monkeypatch):
    """The DiT stops in its 3rd forward pass (sampler step 3) until `go` is set; `reached` says it got there."""
    dit, calls = app.state.studio.painter.dit, [0]
    real, reached, go = dit.forward_with_cond, threading.Event(), threading.Event()

    def forward(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            reached.set()
            go.wait(20)
        return real(*a, **k)

    monkeypatch.setattr(dit, "forward_with_cond", forward)
    yield reached, go
    go.set()


def until(fetch, done, seconds=20.0):
    """fetch() again every 20 ms until done(its value); that value."""
    t0 = time.perf_counter()
    while not done(value := fetch()) and time.perf_counter() - t0 < seconds:
        time.sleep(0.02)
    return value


def test_a_job_reports_its_steps_and_a_cancel_stops_it_at_the_next_one(client, app, gated):
    reached, go = gated
    out_dir = app.state.studio.out_dir
    before = sorted(out_dir.iterdir()) if out_dir.exists() else []
    r = client.post("/api/jobs", data={**FAST, "steps": "50"})
    assert r.status_code == 202 and r.json()["state"] in ("queued", "running"), r.text
    job = r.json()["id"]
    assert reached.wait(20)
    view = client.get(f"/api/jobs/{job}").json()
    assert view["state"] == "running" and (view["step"], view["steps"]) == (2, 50) and view["elapsed"] >= 0
    time.sleep(0.05)  # its clock runs while it runs (2 steps may take under the 10 ms that 2 decimals show)
    assert client.get(f"/api/jobs/{job}").json()["elapsed"] >= view["elapsed"] + 0.04
    assert [j["id"] for j in client.get("/api/jobs").json()["jobs"]] == [job]
    assert client.post(f"/api/jobs/{job}/cancel").json() | {"elapsed": 0} == view | {"elapsed": 0, "cancelling": True}
    go.set()
    view = until(lambda: client.get(f"/api/jobs/{job}").json(), lambda v: v["state"] not in ("queued", "running"))
    assert view["state"] == "cancelled" and view["step"] == 2 and "result" not in view
    assert (sorted(out_dir.iterdir()) if out_dir.exists() else []) == before
    assert client.get("/api/jobs").json() == {"jobs": []}
    assert client.get("/api/jobs/0123").status_code == 404


@pytest.mark.parametrize("sampler, strength, steps, n", [("ddim", None, 3, 3), ("dpmpp_2m", None, 3, 3),
                                                         ("ddim", 0.002, 5, 2)])  # t0 = 1: 2 steps at most
def test_the_sampler_tells_its_callback_each_step_it_really_runs(app, sampler, strength, steps, n):
    painter, heard = app.state.studio.painter, []
    cond, neg = painter.parse("smile")[0], painter.parse("")[0]
    method, hear = SamplerConfig(name="t", sampler=sampler, steps=steps), lambda i, k: heard.append((i, k))
    if strength is None:
        painter.sample(cond, neg, method, 4.0, 0, 1, callback=hear)
    else:
        painter.img2img(Image.new("RGB", (64, 64)), cond, neg, method, 4.0, strength, 0, 1, callback=hear)
    assert heard == [(i, n) for i in range(n + 1)]


def test_the_history_lists_the_folders_batches_newest_first_to_a_new_server_too(client, app):
    older, newer = post(client).json(), post(client, {"n": "1"}).json()
    out_dir = app.state.studio.out_dir
    (out_dir / "20990101-000000-0000abcd-0.png").write_bytes(png())  # a batch without its zip: unfinished
    (out_dir / "notes.zip").write_bytes(b"not ours")
    batches = client.get("/api/history").json()["batches"]
    assert batches[:2] == [newer, older] and all(b["images"] for b in batches)
    with TestClient(create_app(app.state.studio.painter, out_dir)) as fresh:
        assert fresh.get("/api/history", params={"limit": 2}).json()["batches"] == [newer, older]


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


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for the module (starting one costs seconds)."""
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


@pytest.fixture
def browser(chromium):
    """The module's browser in its usual window (each test opens the page itself)."""
    chromium.set_window_size(1280, 900)
    return chromium


def test_the_page_draws_in_a_headless_browser(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    browser.get(served)
    wait.until(lambda d: "6 tags" in d.find_element(By.ID, "run").text)
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("red hair, sm")
    options = lambda d: [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#prompt-tags option")]  # noqa: E731
    wait.until(lambda d: options(d) == ["red hair, smile"])
    browser.find_element(By.ID, "n").clear()
    browser.find_element(By.ID, "n").send_keys("17")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: "Images must be a whole number from 1 to 16." in d.find_element(By.ID, "message").text)
    assert browser.find_element(By.ID, "message").get_attribute("class") == "error"
    assert "invalid" in browser.find_element(By.ID, "n").get_attribute("class")
    assert browser.find_element(By.CSS_SELECTOR, '.note[data-for="n"]').text == "Images must be a whole number from 1 to 16."
    browser.save_screenshot(str(tmp_path / "refused.png"))
    prompt.clear()
    prompt.send_keys("red hair, smile")
    assert browser.find_elements(By.CSS_SELECTOR, '.note[data-for="n"]')  # until the field changes
    for field, value in (("n", "3"), ("steps", "3"), ("seed", "11")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "generate").click()
    loaded = "return [...document.querySelectorAll('.batch:first-child figure.sample img')].filter(i => i.naturalWidth === 64).length"
    wait.until(lambda d: d.execute_script(loaded) == 3)
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "figure.sample figcaption")]
    assert captions[0].startswith("seed 11 · ddim 3 steps · cfg 4 · eta 0") and captions[2].startswith("seed 13")
    assert browser.find_element(By.ID, "message").text == "" and not browser.find_elements(By.CSS_SELECTOR, ".note")
    assert "invalid" not in browser.find_element(By.ID, "n").get_attribute("class")
    assert "red hair, smile" in browser.find_element(By.CSS_SELECTOR, ".batch h2").text
    assert browser.find_element(By.CSS_SELECTOR, "a.zip").get_attribute("href").endswith(".zip")
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert Image.open(tmp_path / "page.png").size[0] > 0


def by_id(browser, name):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, name)


def fill(browser, **fields):
    for name, value in fields.items():
        by_id(browser, name).clear()
        by_id(browser, name).send_keys(value)


def opened(browser, url):
    """The page at `url`, once it has loaded the run's info and the folder's earlier batches."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    wait = WebDriverWait(browser, 20, poll_frequency=0.05)
    wait.until(lambda d: "tags, up to" in by_id(d, "run").text)
    return wait


def test_the_page_shows_step_i_of_n_and_its_cancel_stops_the_drawing(served, browser, app, gated):
    reached, go = gated
    out_dir = app.state.studio.out_dir
    before = sorted(out_dir.iterdir()) if out_dir.exists() else []
    wait = opened(browser, served)
    fill(browser, prompt="smile", steps="40", n="1")
    by_id(browser, "generate").click()
    assert reached.wait(20)
    wait.until(lambda d: by_id(d, "progress-text").text.startswith("Step 2 of 40 · "))
    assert by_id(browser, "progress").is_displayed() and not by_id(browser, "generate").is_enabled()
    assert by_id(browser, "progress-text").text.endswith(" s")
    by_id(browser, "cancel").click()
    wait.until(lambda d: by_id(d, "progress-text").text.startswith("Cancelling… Step 2 of 40 · "))
    assert not by_id(browser, "cancel").is_enabled()
    go.set()
    wait.until(lambda d: by_id(d, "message").text.startswith("Cancelled after step 2 of 40"))
    assert not by_id(browser, "progress").is_displayed() and by_id(browser, "generate").is_enabled()
    assert (sorted(out_dir.iterdir()) if out_dir.exists() else []) == before


def test_a_reload_shows_the_folders_earlier_results_newest_first(served, browser, client):
    from selenium.webdriver.common.by import By

    post(client, {"prompt": "hat", "n": "1"})
    newest = post(client, {"prompt": "glasses", "n": "1"}).json()
    batches = len(client.get("/api/history").json()["batches"])
    wait = opened(browser, served)
    for _ in range(2):
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".batch")) == batches)
        assert browser.find_element(By.CSS_SELECTOR, ".batch h2").text.startswith("glasses (1 in ")
        assert browser.find_element(By.CSS_SELECTOR, "figure.sample img").get_attribute("src").endswith(
            newest["images"][0]["url"])
        browser.refresh()


def test_the_form_follows_its_state(served, browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    wait = opened(browser, served)
    assert by_id(browser, "eta").is_displayed() and not by_id(browser, "strength").is_displayed()
    Select(by_id(browser, "sampler")).select_by_value("dpmpp_2m")
    assert not by_id(browser, "eta").is_displayed() and not by_id(browser, "eta").is_enabled()
    Select(by_id(browser, "sampler")).select_by_value("ddim")
    assert by_id(browser, "eta").is_displayed()
    (tmp_path / "init.png").write_bytes(png((40, 30)))
    by_id(browser, "init_image").send_keys(str(tmp_path / "init.png"))
    wait.until(lambda d: d.execute_script("return document.getElementById('init-thumb').naturalWidth") == 40)
    assert by_id(browser, "strength").is_displayed() and by_id(browser, "init-thumb").is_displayed()
    by_id(browser, "init-remove").click()
    assert not by_id(browser, "strength").is_displayed() and not by_id(browser, "init-thumb").is_displayed()
    assert by_id(browser, "init_image").get_attribute("value") == ""


def test_tags_are_offered_counted_against_the_limit_and_flagged_when_both_wanted_and_negative(served, browser):
    from selenium.webdriver.common.by import By

    wait = opened(browser, served)
    buttons = lambda d: {b.text: b for b in d.find_elements(By.CSS_SELECTOR, "#vocab-tags button.tag")}  # noqa: E731
    wait.until(lambda d: len(buttons(d)) == 6)
    for tag in ("red hair", "blue hair", "smile", "hat", "glasses"):
        buttons(browser)[tag].click()
    assert by_id(browser, "prompt").get_attribute("value") == "red hair, blue hair, smile, hat, glasses"
    assert by_id(browser, "prompt-count").text == "5 of at most 4 tags"
    assert "invalid" in by_id(browser, "prompt").get_attribute("class")
    by_id(browser, "generate").click()
    message = "Tags: has 5 tags; the model reads at most 4 per prompt (remove 1)."
    wait.until(lambda d: by_id(d, "message").text == message)
    assert browser.find_element(By.CSS_SELECTOR, '.note[data-for="prompt"]').text == message
    by_id(browser, "negative").click()  # the vocabulary now adds to the negative tags
    assert by_id(browser, "vocab-target").text == "Negative tags"
    buttons(browser)["smile"].click()
    assert by_id(browser, "negative").get_attribute("value") == "smile"
    flag = browser.find_element(By.CSS_SELECTOR, '.note[data-for="negative"]')
    assert flag.text.startswith("smile: both wanted and negative") and "warn" in flag.get_attribute("class")


def test_a_narrow_window_stacks_the_form_above_the_results(served, browser):
    from selenium.webdriver.common.by import By

    browser.set_window_size(480, 900)
    opened(browser, served)
    form, main = (browser.find_element(By.CSS_SELECTOR, s).rect for s in ("#controls", "main"))
    assert main["y"] >= form["y"] + form["height"] - 1 and form["width"] > 400 and main["width"] > 400
    browser.set_window_size(1280, 900)
    form, main = (browser.find_element(By.CSS_SELECTOR, s).rect for s in ("#controls", "main"))
    assert main["x"] >= form["x"] + form["width"] and main["y"] == form["y"]
