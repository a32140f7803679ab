"""The browser page: a real server on localhost, driven through gradio_client and through Debian's
headless Chromium (selenium), as users reach it."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from emojidiff.commands.app import AppOptions, serve
from emojidiff.images import save_image
from emojidiff.models.bundle import fresh_model
from emojidiff.world import Expression, Identity, render_batch

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = "emojidiff:emojidiff-world"
STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def photo_model(tmp_path_factory) -> Path:
    """A model folder whose identity encoder (dlib) looks for a face in every upload."""
    folder = tmp_path_factory.mktemp("models") / "dlib-model"
    fresh_model(identity_encoder_spec="dlib", mask_from="aligner").save(folder)
    return folder


@pytest.fixture(scope="module")
def server(photo_model):
    port = free_port()
    page = serve(AppOptions(models=[PACKAGED, str(photo_model)], port=port), block=False)
    yield f"http://127.0.0.1:{port}/"
    page.close()


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uploads")
    out = render_batch(
        [Identity.sample(4_100_001), Identity.sample(4_100_002)],
        [Expression.preset("neutral"), Expression.preset("surprised")],
        "cel",
        size=64,
        seeds=[1, 2],
    )
    files = {"identity": folder / "identity.png", "template": folder / "template.png"}
    save_image(out.images[0].numpy(), files["identity"])
    save_image(out.images[1].numpy(), files["template"])
    (folder / "notes.png").write_text("this is not an image")
    files["not_an_image"] = folder / "notes.png"
    save_image(np.full((96, 96, 3), 200, np.uint8), folder / "wall.png")  # a plain wall: no face
    files["faceless"] = folder / "wall.png"
    return files


def generate(
    client: Client, id_file=None, world_id=4_000_001, expr_file=None, preset="happy", model=PACKAGED
):
    return client.predict(
        handle_file(str(id_file)) if id_file else None,
        world_id,
        handle_file(str(expr_file)) if expr_file else None,
        None,
        preset,
        "",
        "cel",
        1.0,
        1.0,
        5.0,
        STEPS,
        0,
        model,
        api_name="/generate",
    )


def test_both_uploads_give_an_image_and_its_scores(server, uploads):
    client = Client(server, verbose=False)
    ref, tmpl, out, scores = generate(client, uploads["identity"], None, uploads["template"], None)
    reference = np.asarray(Image.open(ref).convert("RGB"))
    np.testing.assert_array_equal(reference, np.asarray(Image.open(uploads["identity"]).convert("RGB")))
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (64, 64, 3) and image.std() > 5
    assert "identity similarity" in scores and "expression error" in scores
    sim = float(scores.split("**identity similarity** ")[1].split()[0])
    assert -1.0 <= sim <= 1.0


def test_a_world_identity_and_a_preset_need_no_upload(server):
    _, tmpl, out, scores = generate(Client(server, verbose=False), None, 4_000_001, None, "wink")
    assert np.asarray(Image.open(tmpl)).shape[:2] == (64, 64)
    assert "expression error" in scores


def test_a_file_that_is_not_an_image_is_one_message(server, uploads):
    with pytest.raises(AppError, match="notes.png") as err:
        generate(Client(server, verbose=False), uploads["not_an_image"], None)
    assert "Traceback" not in str(err.value)


def test_a_photo_without_a_face_is_one_message(server, uploads, photo_model):
    with pytest.raises(AppError, match="(?i)no face") as err:
        generate(Client(server, verbose=False), uploads["faceless"], None, model=str(photo_model))
    assert "identity photo" in str(err.value) and "Traceback" not in str(err.value)


def test_a_model_folder_missing_a_file_stops_the_app_naming_it(tmp_path, photo_model):
    broken = tmp_path / "broken"
    shutil.copytree(photo_model, broken)
    (broken / "adapter" / "adapter.safetensors").unlink()
    with pytest.raises(Exception, match="adapter.safetensors"):
        serve(AppOptions(models=[str(broken)], port=free_port()), block=False)


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (make test installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def test_a_real_browser_uploads_two_images_and_sees_the_result(server, uploads, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    wait = WebDriverWait(browser, 120)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#generate")))
    for elem_id, key in (("identity-upload", "identity"), ("template-upload", "template")):
        field = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]")
        field.send_keys(str(uploads[key]))
        wait.until(lambda d, e=elem_id: d.find_elements(By.CSS_SELECTOR, f"#{e} a, #{e} .file-name, #{e} td"))
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    image = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#output img")))
    wait.until(lambda d: "identity similarity" in d.find_element(By.CSS_SELECTOR, "#scores").text)
    assert image.get_attribute("src")
    browser.execute_script("window.scrollTo(0, 0)")
    shot = Path(ROOT / "outputs" / "app" / "page.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(shot))  # docs/app.png is this file, copied (README shows it)
    assert Image.open(shot).size[0] >= 1000
