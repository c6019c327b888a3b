"""The Gradio Space (space/app.py), served on 127.0.0.1 with a tiny checkpoint and called through gradio_client."""

import json
import logging
import os
import socket
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import httpx  # noqa: E402
import torch  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from conftest import tiny_config, write_dicom  # noqa: E402
from modeling_anatomy_vlm import ANATOMICAL_REGIONS, AnatomyVLMModel, AnatomyVLMProcessor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "space"))
import app  # noqa: E402

FINDINGS = ["pleural effusion", "pneumothorax", "consolidation"]  # few findings: a fast warm-up
MAX_UPLOAD_MB = 1.0
MAX_MEGAPIXELS = 1.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_tiny_space(directory: Path):
    """Save a tiny checkpoint in `directory`, serve the Space on a free port of 127.0.0.1: `(demo, space, url)`."""
    torch.manual_seed(0)
    config = tiny_config(findings=FINDINGS)
    checkpoint = directory / "checkpoint"
    AnatomyVLMModel.from_encoders(config).save_pretrained(checkpoint)
    AnatomyVLMProcessor.from_model_config(config).save_pretrained(checkpoint)
    settings = app.Settings(
        model=str(checkpoint), max_upload_mb=MAX_UPLOAD_MB, max_megapixels=MAX_MEGAPIXELS, concurrency=2
    )
    demo, space = app.launch(
        settings, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, ssr_mode=False
    )
    return demo, space, demo.local_url


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    demo, space, url = launch_tiny_space(tmp_path_factory.mktemp("space"))
    yield space, Client(url, verbose=False), url
    demo.close()


@pytest.fixture(scope="module")
def phantom_png(served) -> Path:
    return Path(served[0].examples[0])


def interpret(client: Client, path) -> dict:
    return client.predict(handle_file(str(path)), api_name="/interpret")


def assert_valid_result(result: dict, width: int, height: int):
    assert result["image_size"] == [width, height]
    assert [r["name"] for r in result["regions"]] == list(ANATOMICAL_REGIONS)
    for region in result["regions"]:
        x1, y1, x2, y2 = region["box"]
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert set(region["scores"]) == set(FINDINGS)
        assert all(0.0 <= p <= 1.0 for p in region["scores"].values())
    assert set(result["findings"]) == set(FINDINGS)


def test_interpret_endpoint_gives_the_same_result_for_png_and_monochrome1_dicom(served, phantom_png, tmp_path):
    space, client, _ = served
    pixels = np.asarray(Image.open(phantom_png))
    height, width = pixels.shape
    # MONOCHROME1 stores inverted values (high = black) so the DICOM displays exactly like the PNG.
    dicom = write_dicom(tmp_path / "same.dcm", 255 - pixels, photometric="MONOCHROME1", bits_stored=8)

    from_png, from_dicom = interpret(client, phantom_png), interpret(client, dicom)

    assert_valid_result(from_png, width, height)
    assert from_dicom["image_size"] == from_png["image_size"]
    for png_region, dicom_region in zip(from_png["regions"], from_dicom["regions"]):
        np.testing.assert_allclose(dicom_region["box"], png_region["box"], atol=0.02)
        np.testing.assert_allclose(list(dicom_region["scores"].values()), list(png_region["scores"].values()), atol=1e-4)
    np.testing.assert_allclose(list(from_dicom["findings"].values()), list(from_png["findings"].values()), atol=1e-4)
    assert from_png == space.model.interpret(str(phantom_png), space.processor)[0]  # the API is model.interpret


def test_broken_upload_gives_a_message_and_the_app_keeps_serving(served, phantom_png, tmp_path):
    _, client, _ = served
    broken = tmp_path / "broken.png"
    broken.write_bytes(phantom_png.read_bytes()[:400])  # a PNG cut off mid-stream
    with pytest.raises(AppError, match="corrupt or truncated") as error:
        interpret(client, broken)
    assert "broken.png" not in str(error.value)  # messages do not echo file names

    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not an x-ray")
    with pytest.raises(AppError, match="use PNG, JPEG or DICOM"):
        interpret(client, not_an_image)

    assert len(interpret(client, phantom_png)["regions"]) == 29


def test_dicom_metadata_is_never_returned_or_logged(served, phantom_png, tmp_path, caplog, capfd):
    _, client, _ = served
    patient = dict(PatientName="Secret^Patient", PatientID="Secret-ID", PatientBirthDate="Secret1999")  # invalid DA
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dicom = write_dicom(tmp_path / "study.dcm", np.asarray(Image.open(phantom_png)), bits_stored=8, **patient)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(dicom.read_bytes()[:-5000])
    caplog.clear()
    capfd.readouterr()

    with caplog.at_level(logging.DEBUG):
        result = interpret(client, dicom)
        with pytest.raises(AppError, match="DICOM") as error:
            interpret(client, truncated)
    printed = capfd.readouterr()
    for text in (json.dumps(result), str(error.value), caplog.text, printed.out, printed.err):
        assert "Secret" not in text


def test_limits_give_clear_messages(served, tmp_path):
    space, client, url = served
    too_many_pixels = tmp_path / "wide.png"
    Image.fromarray(np.zeros((1100, 1000), dtype=np.uint8)).save(too_many_pixels)  # 1.1 MP in a small file
    with pytest.raises(AppError, match=r"1000 x 1100 px .* limit is 1 megapixels"):
        interpret(client, too_many_pixels)

    too_large = tmp_path / "large.dcm"
    noise = np.random.default_rng(0).integers(0, 2**16, size=(800, 800), dtype=np.uint16)  # 1.2 MiB, 0.64 MP
    write_dicom(too_large, noise)
    with open(too_large, "rb") as handle:  # the server refuses the upload itself
        response = httpx.post(f"{url}gradio_api/upload", files={"files": ("large.dcm", handle)})
    assert response.status_code == 413 and "maximum allowed size" in response.text
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # gradio_client checks it first
        interpret(client, too_large)
    with pytest.raises(gr.Error, match="The file is 1.2 MB; the limit is 1 MB"):  # and so does the handler
        space.read_upload(str(too_large))


def test_twenty_concurrent_requests_all_succeed(served, phantom_png):
    _, client, _ = served
    jobs = [client.submit(handle_file(str(phantom_png)), api_name="/interpret") for _ in range(20)]
    results = [job.result(timeout=120) for job in jobs]
    assert all(result == results[0] for result in results)
    assert len(results[0]["regions"]) == 29


def test_ui_handlers_render_boxes_table_question_and_selected_region(served, phantom_png):
    space, _, _ = served
    result = space.interpret(str(phantom_png))
    annotated, rows, findings, region_panel, question_panel = space.render(str(phantom_png), result)

    image, annotations = annotated["value"]
    assert image.shape == np.asarray(Image.open(phantom_png)).shape
    assert [label for _, label in annotations] == [r["name"] for r in result["regions"]]
    assert all(mask.shape == image.shape for mask, _ in annotations)
    highest = max(result["regions"], key=lambda r: max(r["scores"].values()))
    assert annotated["color_map"][highest["name"]] == app.score_colour(max(highest["scores"].values()))
    assert len(rows) == 29 * len(FINDINGS)
    assert [row[2] for row in rows] == sorted((row[2] for row in rows), reverse=True)
    assert findings == result["findings"]
    assert region_panel is None and question_panel is None

    overlay, per_region = space.ask(str(phantom_png), "  rib   fracture ")
    labels = [label for _, label in overlay["value"][1]]
    assert len(labels) == 29 and labels[0].startswith("right lung: ")
    assert list(per_region["value"]) == list(ANATOMICAL_REGIONS)
    assert per_region["label"].startswith("'rib fracture' per region")
    with pytest.raises(gr.Error, match="Type a finding"):
        space.ask(str(phantom_png), "   ")

    selected = space.show_region(result, gr.SelectData(None, {"index": 24, "value": "cardiac silhouette"}))
    assert selected["label"] == "cardiac silhouette: finding scores"
    assert selected["value"] == result["regions"][24]["scores"]


def test_boxes_are_drawn_as_outlines_inside_the_image():
    mask = app.box_mask((20, 30), [5, 4, 25.4, 16], border=2)
    assert mask[4, 5] == mask[15, 24] == 1.0  # corners of the outline
    assert mask[10, 15] == pytest.approx(app.BOX_FILL_ALPHA)  # faint inside
    assert mask[:4].sum() == mask[16:].sum() == mask[:, 25:].sum() == 0
    assert app.box_mask((20, 30), [-10, -10, 50, 50], border=2)[0, 0] == 1.0  # clipped to the image
    assert app.score_colour(0.0) == "#0df20d" and app.score_colour(1.0) == "#f20d0d"


def test_missing_checkpoint_says_to_run_make_quickstart(tmp_path, monkeypatch):
    monkeypatch.setattr(app, "DEFAULT_MODEL", tmp_path / "outputs" / "quickstart" / "model")
    with pytest.raises(app.CheckpointNotFoundError, match="run `make quickstart` to build it"):
        app.load_checkpoint(str(app.DEFAULT_MODEL))
    with pytest.raises(app.CheckpointNotFoundError, match="check ANATOMY_VLM_MODEL.*make quickstart"):
        app.load_checkpoint(str(tmp_path / "no-model-here"))
