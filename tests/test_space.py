"""The Gradio Space (space/app.py), served on 127.0.0.1 with a tiny checkpoint and called through gradio_client."""

import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gradio as gr
import httpx
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from conftest import tiny_config, write_dicom
from modeling_anatomy_vlm import ANATOMICAL_REGIONS, AnatomyVLMModel, AnatomyVLMProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "space"))
import app  # noqa: E402

FINDINGS = ["pleural effusion", "pneumothorax", "consolidation"]  # few findings: a fast warm-up
MAX_UPLOAD_MB = 1.0
MAX_MEGAPIXELS = 1.0
PROMPT_MEMO_MB = 0.25  # about two free-text findings (59 prompts each) beyond the pinned default prompts
CONCURRENCY = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_tiny_space(directory: Path):
    """Save a tiny checkpoint (its default prompts precomputed, as training saves them) in `directory`, serve the
    Space on a free port of 127.0.0.1 with gradio's cache in `directory/gradio-cache`: `(demo, space, url)`."""
    torch.manual_seed(0)
    config = tiny_config(findings=FINDINGS)
    checkpoint = directory / "checkpoint"
    model, processor = AnatomyVLMModel.from_encoders(config), AnatomyVLMProcessor.from_model_config(config)
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    model.save_prompt_embeds(checkpoint, processor)
    os.environ["GRADIO_TEMP_DIR"] = str(directory / "gradio-cache")  # read when the app and its server are made
    settings = app.Settings(
        model=str(checkpoint), max_upload_mb=MAX_UPLOAD_MB, max_megapixels=MAX_MEGAPIXELS, concurrency=CONCURRENCY,
        prompt_memo_mb=PROMPT_MEMO_MB,
    )
    demo, space = app.launch(
        settings, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, ssr_mode=False
    )
    return demo, space, demo.local_url


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    demo, space, url = launch_tiny_space(tmp_path_factory.mktemp("space"))
    yield space, Client(url, verbose=False), url, demo
    demo.close()


@pytest.fixture(scope="module")
def phantom_png(served) -> Path:
    return Path(served[0].examples[0])


def interpret(client: Client, path) -> dict:
    return client.predict(handle_file(str(path)), api_name="/interpret")


def gradio_cache() -> Path:
    return Path(os.environ["GRADIO_TEMP_DIR"])  # set by launch_tiny_space


def cache_files() -> set[Path]:
    return {path for path in gradio_cache().rglob("*") if path.is_file()}


def copy_into_cache(space, source: Path, name: str) -> str:
    """`source` as an upload: a copy in gradio's cache, in a folder of its own."""
    folder = space.cache_dir / uuid.uuid4().hex
    folder.mkdir(parents=True)
    return str(shutil.copy(source, folder / name))


def page_request(session: str) -> gr.Request:
    return gr.Request(session_hash=session)


def analyse_on_page(space, upload: str, session: str):
    """What the page's upload event runs: the validator as the request joins the queue, then the handler."""
    space.hold_upload(upload)
    return space.analyse({"path": upload, "meta": {"_type": "gradio.FileData"}}, page_request(session))


def fn_index(demo, handler) -> int:
    return next(index for index, fn in demo.fns.items() if fn.fn == handler)


def call_like_the_page(url: str, fn_index: int, data: list, session: str) -> dict:
    """Run an event the way the page does: plain HTTP to gradio's queue (any client can); the final message."""
    with httpx.Client(timeout=120) as http:
        body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}
        http.post(f"{url}gradio_api/queue/join", json=body).raise_for_status()
        with http.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                message = json.loads(line[len("data:"):]) if line.startswith("data:") else {}
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the queue closed the stream before the event completed")


def upload_over_http(url: str, path: Path) -> dict:
    with open(path, "rb") as handle:
        response = httpx.post(f"{url}gradio_api/upload", files={"files": (path.name, handle)})
    response.raise_for_status()
    return {"path": response.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


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
    space, client, _, _ = served
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
    _, client, _, _ = served
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
    _, client, _, _ = served
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


def test_api_uploads_are_deleted_once_read_and_leave_nothing_in_the_cache(served, phantom_png, tmp_path, caplog):
    space, client, url, _ = served
    named_after_the_patient = tmp_path / "Doe_Jane_1961-04-02.dcm"
    write_dicom(named_after_the_patient, np.asarray(Image.open(phantom_png)), bits_stored=8, PatientName="Doe^Jane")
    broken = tmp_path / "Doe_Jane_broken.png"
    broken.write_bytes(phantom_png.read_bytes()[:400])
    interpret(client, phantom_png)  # the app's own files (examples) are in the cache from the first request on
    before = cache_files()

    with caplog.at_level(logging.DEBUG):
        assert len(interpret(client, named_after_the_patient)["regions"]) == 29
        with pytest.raises(AppError, match="corrupt or truncated"):  # a failed request deletes its upload too
            interpret(client, broken)

    assert cache_files() == before  # no upload, no drawn image, no empty temporary file left behind
    assert not list(gradio_cache().rglob("*Doe_Jane*"))
    assert "Doe_Jane" not in caplog.text


def test_limits_give_clear_messages(served, tmp_path):
    space, client, url, _ = served
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


def test_forty_concurrent_requests_all_succeed(served, phantom_png):
    _, client, _, _ = served
    start = time.perf_counter()

    def timed_request() -> tuple[dict, float]:
        result = interpret(client, phantom_png)  # the same file 40 times: gradio stores it at one path
        return result, time.perf_counter() - start

    with ThreadPoolExecutor(40) as pool:
        done = [future.result(timeout=300) for future in [pool.submit(timed_request) for _ in range(40)]]
    results, latencies = [result for result, _ in done], [latency for _, latency in done]
    assert all(result == results[0] for result in results)
    assert len(results[0]["regions"]) == 29
    p50, p95 = np.percentile(latencies, [50, 95])
    print(f"\n40 concurrent /interpret requests (concurrency {CONCURRENCY}): p50 {p50:.2f} s, p95 {p95:.2f} s, "
          f"all done in {max(latencies):.2f} s")


def test_ui_handlers_render_boxes_table_question_and_selected_region(served, phantom_png):
    space, _, _, _ = served
    upload = copy_into_cache(space, phantom_png, "cxr.png")
    result, warning, annotated, rows, findings, region_panel, question_panel = analyse_on_page(space, upload, "ui")

    assert result == space.model.interpret(upload, space.processor)[0]
    assert warning["visible"] is False  # the tiny model's result has no out-of-distribution flag
    image_path, annotations = annotated["value"]
    assert image_path == str(space.display_path(upload))
    image = np.asarray(Image.open(image_path))
    assert image.shape == np.asarray(Image.open(phantom_png)).shape
    assert [label for _, label in annotations] == [r["name"] for r in result["regions"]]
    assert all(mask.shape == image.shape for mask, _ in annotations)
    highest = max(result["regions"], key=lambda r: max(r["scores"].values()))
    assert annotated["color_map"][highest["name"]] == app.score_colour(max(highest["scores"].values()))
    assert len(rows) == 29 * len(FINDINGS)
    assert [row[2] for row in rows] == sorted((row[2] for row in rows), reverse=True)
    assert findings == result["findings"]
    assert region_panel is None and question_panel is None

    overlay, per_region = space.ask(upload, "  rib   fracture ")
    labels = [label for _, label in overlay["value"][1]]
    assert len(labels) == 29 and labels[0].startswith("right lung: ")
    assert list(per_region["value"]) == list(ANATOMICAL_REGIONS)
    assert per_region["label"].startswith("'rib fracture' per region")
    with pytest.raises(gr.Error, match="Type a finding"):
        space.ask(upload, "   ")

    selected = space.show_region(result, gr.SelectData(None, {"index": 24, "value": "cardiac silhouette"}))
    assert selected["label"] == "cardiac silhouette: finding scores"
    assert selected["value"] == result["regions"][24]["scores"]
    space.end_session(page_request("ui"))


def test_page_upload_is_deleted_when_replaced_or_the_tab_closes_and_examples_stay(served, phantom_png):
    space, _, _, _ = served
    page = page_request("page-1")
    first, second = (copy_into_cache(space, phantom_png, name) for name in ("first.png", "second.png"))
    analyse_on_page(space, first, "page-1")
    space.ask(first, "rib fracture")
    assert Path(first).is_file() and space.display_path(first).is_file()  # the page can still ask about it

    analyse_on_page(space, second, "page-1")  # a new upload: the first one and its drawing go
    assert not Path(first).exists() and not space.display_path(first).parent.exists()
    assert not Path(first).parent.exists()
    with pytest.raises(gr.Error, match="no longer on the server.*upload it again"):
        space.ask(first, "rib fracture")

    space.end_session(page)  # the tab closed
    assert not Path(second).exists() and not space.display_path(second).exists()

    # Two pages showing the same file (gradio stores identical uploads at one path): it stays until both let go.
    shared = copy_into_cache(space, phantom_png, "shared.png")
    analyse_on_page(space, shared, "page-1")
    analyse_on_page(space, shared, "page-2")
    space.end_session(page)
    assert Path(shared).is_file()
    space.end_session(page_request("page-2"))
    assert not Path(shared).exists()
    ttl = space.settings.file_ttl_s
    assert served[3].delete_cache == (60, ttl)  # whatever no event deletes goes at most this long after creation


def test_only_interpret_is_in_the_api_and_page_events_share_its_queue_and_memo(served, phantom_png, monkeypatch):
    space, client, url, demo = served
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/interpret"}
    ask = fn_index(demo, space.ask)
    with pytest.raises(ValueError, match="Invalid function index"):  # gradio_client refuses the page's events
        client.predict(handle_file(str(phantom_png)), "rib fracture", fn_index=ask)

    # Any HTTP client can still run them through the queue, as the page does; they wait for the same model slots.
    interpret_model, lock, running, peak = space.model.interpret, threading.Lock(), [0], [0]

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.2)
            return interpret_model(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(space.model, "interpret", counted)
    image = upload_over_http(url, phantom_png)
    with ThreadPoolExecutor(8) as pool:
        asks = [pool.submit(call_like_the_page, url, ask, [image, f"new finding {i}"], f"raw-{i}") for i in range(6)]
        apis = [client.submit(handle_file(str(phantom_png)), api_name="/interpret") for _ in range(4)]
        messages = [future.result(timeout=300) for future in asks]
        assert all(len(job.result(timeout=300)["regions"]) == 29 for job in apis)
    assert all(message["success"] for message in messages), messages
    assert peak[0] <= CONCURRENCY  # six free-text calls and four /interpret calls, at most two at a time

    memo = space.model.prompt_memo
    assert memo.max_bytes == int(PROMPT_MEMO_MB * 2**20)
    assert memo.nbytes <= memo.max_bytes and len(memo) - memo.num_pinned < 6 * 59  # early findings were evicted
    assert memo.num_pinned == len(FINDINGS) * (1 + 2 * len(ANATOMICAL_REGIONS))  # the checkpoint's defaults stay


def test_page_says_what_the_model_was_trained_on_and_warns_out_of_distribution(served, phantom_png, monkeypatch):
    space, _, _, demo = served
    notice = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "model-notice")
    assert notice.value == space.notice == app.PHANTOM_NOTICE  # the tiny checkpoint records nothing: phantom
    assert "synthetic phantoms" in notice.value and "no clinical meaning" in notice.value

    upload = copy_into_cache(space, phantom_png, "ood.png")
    interpret_model = space.model.interpret
    flagged = {"score": 3.1, "threshold": 2.0, "warning": True}
    monkeypatch.setattr(space.model, "interpret", lambda *a, **k: [{**interpret_model(*a, **k)[0], "ood": flagged}])
    warning = analyse_on_page(space, upload, "ood")[1]
    assert warning["visible"] is True
    assert "unlike the images the model was trained on" in warning["value"] and "3.10" in warning["value"]
    flagged["warning"] = False
    assert analyse_on_page(space, upload, "ood")[1]["visible"] is False
    space.end_session(page_request("ood"))


def test_training_record_decides_the_notice(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    assert app.training_data(str(run / "model")) is None  # nothing recorded: phantom-trained is assumed
    (run / "train_config.yaml").write_text("data: {dataset: phantom, root: data/phantom-quickstart}\n")
    assert app.model_notice(str(run / "model")) == app.PHANTOM_NOTICE
    (run / "train_config.yaml").write_text("data: {dataset: imagenome, root: /x, phantom: {n: 8, seed: 0}}\n")
    assert app.training_data(str(run / "model")) is None  # Chest ImaGenome layout, generated by the phantom maker
    (run / "train_config.yaml").write_text("data: {dataset: imagenome, root: /data/mimic}\n")
    assert app.training_data(str(run / "model")) == "the `imagenome` data set"
    assert "trained on the `imagenome` data set" in app.model_notice(str(run / "model"))

    carded = tmp_path / "carded"
    carded.mkdir()
    (carded / "README.md").write_text("---\ntags: [medical, phantom-data]\ndatasets: [anatomy-vlm-phantom]\n---\n")
    assert app.training_data(str(carded)) is None
    (carded / "README.md").write_text("---\ntags: [medical]\ndatasets: [chest-imagenome]\n---\n")
    assert app.training_data(str(carded)) == "`chest-imagenome`"


def test_gradio_analytics_are_off(served):
    demo = served[3]
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"  # set by the app before gradio is imported
    assert demo.analytics_enabled is False


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
    # A mistyped folder is an error naming it, not a Hub request; Hub code only at a pinned commit.
    with pytest.raises(app.CheckpointNotFoundError, match="outptus/quickstart: no such model folder"):
        app.load_checkpoint("outptus/quickstart")
    with pytest.raises(app.CheckpointNotFoundError, match="only at a pinned commit"):
        app.load_checkpoint("hf://someone/anatomy-vlm@main")
