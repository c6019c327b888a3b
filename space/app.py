"""Anatomy-VLM Space: upload a chest X-ray (PNG, JPEG or DICOM), see its 29 anatomical regions and the
zero-shot score of every finding in every region, and ask about any finding in free text.

Run it with `make space` (or `python space/app.py`). Settings come from the environment:

* `ANATOMY_VLM_MODEL`: checkpoint folder or Hub id (default: `outputs/quickstart/model`, made by
  `make quickstart`).
* `ANATOMY_VLM_MAX_UPLOAD_MB` (default 32), `ANATOMY_VLM_MAX_MEGAPIXELS` (default 50): input limits.
* `ANATOMY_VLM_CONCURRENCY` (default 2): model calls run at once, all endpoints together.
* `ANATOMY_VLM_MAX_QUEUE` (default 64): requests that may wait; more are refused until the queue drains.
* `ANATOMY_VLM_PROMPT_MEMO_MB` (default 64): memory for the text embeddings of free-text findings.
* `ANATOMY_VLM_FILE_TTL_S` (default 600): the longest an upload or a drawn image stays on disk.

What the app serves and keeps:

* `/interpret` is the one public endpoint: one image file in, `model.interpret`'s dict out; the upload is deleted as
  soon as the request is done. The page's own events (analyse an upload, score a free-text finding, show a region) are
  hidden from the API, but gradio's queue runs any event for any HTTP client, so they share `/interpret`'s
  concurrency limit and queue, and the text embeddings they add are held in the model's bounded memo.
* The page's upload stays on disk while the page can still ask about it: it and the image drawn from it are deleted
  when another file is uploaded, when the tab closes, and `ANATOMY_VLM_FILE_TTL_S` after upload at the latest
  (gradio's `delete_cache`, which also removes the box overlays it writes; all of them go when the server stops).
* DICOM files contribute pixels only; messages and logs never name an uploaded file. Gradio analytics are off
  (no version check, no launch report).
* Next to the results the page says what the checkpoint was trained on: a model trained on synthetic phantoms (the
  default, and what is assumed when the checkpoint records nothing) means nothing on a real radiograph.
"""

import colorsys
import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no version check, no launch report

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from gradio.utils import get_upload_folder  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModel, AutoProcessor  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_MODEL = ROOT / "outputs" / "quickstart" / "model"
DICOM_MAGIC_OFFSET = 128  # "DICM" follows a 128-byte preamble
DISPLAY_SIDE = 768  # long side of the image the boxes are drawn on
BOX_FILL_ALPHA = 0.03  # faint fill, so overlapping boxes keep the film readable
MAX_QUESTION_CHARS = 120
NUM_EXAMPLES = 3
MODEL_QUEUE = "model"  # the concurrency group of every event that runs the model
PHANTOM_TAG = "phantom-data"  # the model card's tag of a checkpoint trained on phantoms (train.release.model_card)

PHANTOM_NOTICE = (
    "⚠️ **This model was trained on synthetic phantoms only** (procedurally drawn chest X-rays, no patient images). "
    "On a real radiograph its boxes and scores carry no clinical meaning: a high score is not a finding and a low "
    "one does not rule anything out. Research demo, not for clinical use."
)
REAL_DATA_NOTICE = (
    "**Research demo, not for clinical use.** The scores are zero-shot image-text similarities of a model trained on "
    "{source}, not diagnoses; they have not been validated for any clinical purpose."
)

logger = logging.getLogger("anatomy_vlm.space")


class CheckpointNotFoundError(FileNotFoundError):
    """No usable Anatomy-VLM checkpoint where the settings point."""


@dataclass(frozen=True)
class Settings:
    model: str = str(DEFAULT_MODEL)
    max_upload_mb: float = 32.0
    max_megapixels: float = 50.0
    concurrency: int = 2
    max_queue: int = 64
    prompt_memo_mb: float = 64.0
    file_ttl_s: int = 600

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ.get
        return cls(
            model=env("ANATOMY_VLM_MODEL", str(DEFAULT_MODEL)),
            max_upload_mb=float(env("ANATOMY_VLM_MAX_UPLOAD_MB", cls.max_upload_mb)),
            max_megapixels=float(env("ANATOMY_VLM_MAX_MEGAPIXELS", cls.max_megapixels)),
            concurrency=int(env("ANATOMY_VLM_CONCURRENCY", cls.concurrency)),
            max_queue=int(env("ANATOMY_VLM_MAX_QUEUE", cls.max_queue)),
            prompt_memo_mb=float(env("ANATOMY_VLM_PROMPT_MEMO_MB", cls.prompt_memo_mb)),
            file_ttl_s=int(env("ANATOMY_VLM_FILE_TTL_S", cls.file_ttl_s)),
        )


def upload_path(upload: dict | str | None) -> str | None:
    """The path of an uploaded file, given as gradio's FileData (what the events receive) or as a path.

    The events take the upload unprocessed (`preprocess=False`; gradio has checked that it is an upload in its cache):
    gr.File's own `type="filepath"` processing leaves an empty temporary file in the cache on every call (gradio 6.31),
    which nothing ever deletes.
    """
    return upload["path"] if isinstance(upload, dict) else upload


def _input_error(message: str) -> gr.Error:
    """A message for the user; not printed to the server log (it is about their file, not a fault)."""
    return gr.Error(message, print_exception=False)


def _model_location_resolver():
    """`resolve_model_location` of `train/engine/hub.py` (standard library only): from the installed project, or
    from a copy named `hub.py` beside this file in a Space deployed on its own."""
    try:
        from train.engine.hub import resolve_model_location
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location("anatomy_vlm_hub", HERE / "hub.py")
        if spec is None or not (HERE / "hub.py").is_file():
            raise CheckpointNotFoundError("copy train/engine/hub.py next to app.py (space/README.md)") from None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        resolve_model_location = module.resolve_model_location
    return resolve_model_location


def load_checkpoint(name_or_path: str):
    """`(model, processor)` from a checkpoint folder, or from `hf://org/name@<commit>` (remote code only at a pinned
    commit; a mistyped folder is an error naming it, never a Hub request)."""
    try:
        location, options = _model_location_resolver()(name_or_path)
    except (FileNotFoundError, ValueError) as err:
        hint = "run `make quickstart` to build it" if Path(name_or_path) == DEFAULT_MODEL else "check ANATOMY_VLM_MODEL"
        raise CheckpointNotFoundError(
            f"No Anatomy-VLM checkpoint: {err}; {hint} (`make quickstart` builds the default one at "
            "outputs/quickstart/model).") from err
    try:
        model = AutoModel.from_pretrained(location, **options)
        processor = AutoProcessor.from_pretrained(location, **options)
    except OSError as err:
        raise CheckpointNotFoundError(
            f"Could not load an Anatomy-VLM checkpoint from {name_or_path} ({err}). Run `make quickstart` to "
            "build the default one, or set ANATOMY_VLM_MODEL to a checkpoint folder or hf://org/name@<commit>."
        ) from err
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor


def training_data(name_or_path: str) -> str | None:
    """What the checkpoint was trained on when its record says it was not the phantom set; None for phantoms and for
    a checkpoint without a readable record (the page then says phantom-trained: the safe reading).

    The record: the trainer's `train_config.yaml` next to a local checkpoint folder (the `phantom` data set, or the
    model card's own rule `train.release.model_card.is_phantom`), else the model card's metadata (`README.md`, local
    or on the Hub), where the `phantom-data` tag marks a phantom-trained checkpoint.
    """
    try:
        if Path(name_or_path).is_dir():
            from train.release.model_card import is_phantom, training_config

            train_cfg = training_config(name_or_path)
            if train_cfg is not None:
                dataset = (train_cfg.get("data") or {}).get("dataset")
                return None if dataset == "phantom" or is_phantom(train_cfg, None) else f"the `{dataset}` data set"
            card_path = Path(name_or_path) / "README.md"
            if not card_path.is_file():
                return None
            name_or_path = str(card_path)
        from huggingface_hub import ModelCard

        card = ModelCard.load(name_or_path)
    except Exception as err:  # an unreadable record says nothing: the phantom notice stays
        logger.warning("could not read the checkpoint's training record (%s)", type(err).__name__)
        return None
    tags, datasets = card.data.tags or [], card.data.datasets or []
    if PHANTOM_TAG in tags or not datasets:
        return None
    return ", ".join(f"`{name}`" for name in datasets)


def model_notice(name_or_path: str) -> str:
    """The statement shown next to every result: what the model was trained on and what its output means."""
    source = training_data(name_or_path)
    return PHANTOM_NOTICE if source is None else REAL_DATA_NOTICE.format(source=source)


def ood_warning(result: dict | None) -> dict:
    """An update of the warning above the results: shown when `interpret` flags the image out-of-distribution."""
    ood = (result or {}).get("ood") or {}
    if not ood.get("warning"):
        return gr.update(value="", visible=False)
    return gr.update(
        value=(
            f"⚠️ **This image is unlike the images the model was trained on** (out-of-distribution score "
            f"{ood['score']:.2f}, threshold {ood['threshold']:.2f}). Treat every box and score below as meaningless."
        ),
        visible=True,
    )


def check_upload(path: str, max_bytes: int, max_pixels: int):
    """Reject files over the size limit and images over the pixel limit from their headers, before decoding."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise _input_error(f"The file is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB.")
    with open(path, "rb") as handle:
        is_dicom = handle.read(DICOM_MAGIC_OFFSET + 4)[DICOM_MAGIC_OFFSET:] == b"DICM"
    frames = 1
    try:
        if is_dicom or path.lower().endswith((".dcm", ".dicom")):
            import pydicom

            header = pydicom.dcmread(path, stop_before_pixels=True)
            width, height = int(header.Columns), int(header.Rows)
            frames = int(getattr(header, "NumberOfFrames", 1) or 1)
        else:
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        raise _input_error(f"The image has too many pixels; the limit is {max_pixels / 1e6:.0f} megapixels.") from None
    except Exception:  # unreadable headers are reported by the image loader, which says what is wrong
        return
    if width * height * frames > max_pixels:
        shape = f"{width} x {height} px" + (f" x {frames} frames" if frames > 1 else "")
        raise _input_error(
            f"The image is {shape} ({width * height * frames / 1e6:.1f} megapixels); "
            f"the limit is {max_pixels / 1e6:.0f} megapixels."
        )


def score_colour(score: float) -> str:
    """Green (0) through yellow to red (1), as a hex colour."""
    hue = (1.0 - min(max(score, 0.0), 1.0)) / 3.0  # 1/3 = green, 0 = red
    red, green, blue = colorsys.hls_to_rgb(hue, 0.5, 0.9)
    return f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}"


def box_mask(shape: tuple[int, int], box, border: int) -> np.ndarray:
    """`[H, W]` opacity in [0, 1]: an opaque outline of `box` (x1, y1, x2, y2 display pixels) with a faint fill."""
    height, width = shape
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, x2 = min(max(x1, 0), width), min(max(x2, 0), width)
    y1, y2 = min(max(y1, 0), height), min(max(y2, 0), height)
    mask = np.zeros(shape, dtype=np.float32)
    mask[y1:y2, x1:x2] = BOX_FILL_ALPHA
    mask[y1:y2, x1 : x1 + border] = mask[y1:y2, max(x2 - border, x1) : x2] = 1.0
    mask[y1 : y1 + border, x1:x2] = mask[max(y2 - border, y1) : y2, x1:x2] = 1.0
    return mask


def render_examples(directory: Path, count: int = NUM_EXAMPLES) -> list[str]:
    """Phantom chest X-rays as PNGs in `directory`; none when the project's phantom generator is absent."""
    try:
        from train.data.phantom import render_phantom
    except ImportError:
        logger.warning("train.data.phantom is not importable: the app starts without example images")
        return []
    paths = []
    for index in range(count):
        path = directory / f"phantom_{index + 1}.png"
        Image.fromarray(render_phantom(index, seed=0).image).save(path)
        paths.append(str(path))
    return paths


class UploadHolds:
    """Who still needs each uploaded file: requests that will read it and pages that show it; the last to let go
    deletes it.

    Gradio stores identical uploads at one path (a folder named after the content's hash), so two requests that send
    the same file share it, and a request deleting "its" upload when done would delete it under the other. A request
    holds its upload from the moment it joins the queue (an event validator) until it is done; a page holds the upload
    it shows until it shows another or closes. When the last hold goes, the file is deleted, unless it was uploaded
    anew since that hold was taken (an upload replaces the file: a request that has not joined the queue yet is on its
    way with it). What no one lets go of (a request cancelled in the queue) is deleted by gradio's `delete_cache`.
    """

    def __init__(self, delete):
        self._delete = delete
        self._lock = threading.Lock()
        self._holds: dict[str, tuple[int, int | None]] = {}  # upload -> (holds, inode the latest hold saw)
        self._pages: dict[str, str] = {}  # session -> the upload its page shows (one of the holds)

    def hold(self, path: str | None):
        if path is None:
            return
        with self._lock:
            for stale in [p for p in self._holds if not os.path.exists(p)]:  # deleted by `delete_cache`
                del self._holds[stale]
            for session in [s for s, p in self._pages.items() if not os.path.exists(p)]:
                del self._pages[session]
            count, _ = self._holds.get(path, (0, None))
            self._holds[path] = (count + 1, _inode(path))

    def let_go(self, path: str | None):
        if path is None:
            return
        with self._lock:
            count, inode = self._holds.pop(path, (1, _inode(path)))  # a direct call (tests) held nothing: it goes
            if count > 1:
                self._holds[path] = (count - 1, inode)
            elif _inode(path) == inode:
                self._delete(path)

    def show_on_page(self, session: str | None, path: str | None):
        """The page of `session` now shows `path`, taking over the hold of the request that analysed it; the upload it
        showed before is let go."""
        with self._lock:
            previous = self._pages.pop(session, None) if session else None
            if session and path is not None:
                self._pages[session] = path
        self.let_go(previous)


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class AnatomyVLMSpace:
    """The model, its processor, the handlers behind each UI element and `/interpret`, and the bookkeeping that
    deletes each upload once nothing needs it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.model, self.processor = load_checkpoint(settings.model)
        self.model.prompt_memo.max_bytes = int(settings.prompt_memo_mb * 2**20)
        self.notice = model_notice(settings.model)
        # The checkpoint's own loader, so the app reads files exactly as the model's processor does.
        self.load_grayscale = sys.modules[type(self.processor.image_processor).__module__].load_grayscale
        self._examples_tmp = tempfile.TemporaryDirectory(prefix="anatomy-vlm-examples-")  # removed at exit
        self.examples_dir = Path(self._examples_tmp.name)
        self.examples = render_examples(self.examples_dir)
        self.cache_dir = Path(get_upload_folder()).resolve()
        self.uploads = UploadHolds(self.delete_upload)
        self._warm_up()

    def _warm_up(self):
        """Embed the default prompts now (none when the checkpoint ships them precomputed), so the first request only
        runs the image side."""
        start = time.perf_counter()
        image = self.examples[0] if self.examples else np.full((256, 256), 0.5, dtype=np.float32)
        self.model.interpret(image, self.processor)
        logger.info("warm-up took %.1f s", time.perf_counter() - start)

    # ------------------------------------------------------------------------------------------ files
    def display_path(self, upload: str) -> Path:
        """Where the display copy of `upload` is written: in gradio's cache (so the browser may fetch it), at a
        name derived from the upload's, so every redraw overwrites one file and deleting the upload finds it."""
        return self.cache_dir / f"display-{hashlib.sha256(upload.encode()).hexdigest()[:32]}" / "image.png"

    def delete_upload(self, upload: str):
        """Delete an upload and its display copy from gradio's cache, with their folders once empty; never anything
        outside the cache. A failure is logged without the file's name. (An example's copy in the cache is deleted
        too: gradio copies it again when the example is next clicked.)"""
        for path in (Path(upload), self.display_path(upload)):
            if not path.resolve().is_relative_to(self.cache_dir):
                continue
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                logger.warning("could not delete an uploaded file (%s)", type(err).__name__)
            if path.parent != self.cache_dir:
                with contextlib.suppress(OSError):  # absent, or not empty: a concurrent request still uses it
                    path.parent.rmdir()

    def hold_upload(self, upload: dict | str | None, *other_inputs):
        """The validator of the events that read an upload: gradio runs it as the request joins the queue, so the
        file is held from then until the request is done (see `UploadHolds`)."""
        self.uploads.hold(upload_path(upload))

    def end_session(self, request: gr.Request):
        """The tab closed: its upload and display copy are deleted (unless another request still reads them)."""
        self.uploads.show_on_page(request.session_hash, None)

    # ------------------------------------------------------------------------------------------ handlers
    def read_upload(self, path: str | None) -> np.ndarray:
        """The uploaded file as float32 `[H, W]` grayscale in [0, 1], or a `gr.Error` saying what is wrong."""
        if path is None:
            raise _input_error("No image given: upload a chest X-ray (PNG, JPEG or DICOM).")
        if not os.path.isfile(path):
            raise _input_error(
                "The uploaded image is no longer on the server (uploads are deleted when another is uploaded, when "
                f"the page closes, and {self.settings.file_ttl_s // 60} minutes after upload): upload it again."
            )
        check_upload(path, int(self.settings.max_upload_mb * 2**20), int(self.settings.max_megapixels * 1e6))
        try:
            return self.load_grayscale(path)
        except ValueError as err:  # ImageLoadError: its message starts with the path, which we do not echo
            reason = str(err).removeprefix(f"{path}: ").replace(path, "the file")
            raise _input_error(f"Could not use the uploaded file: {reason}.") from None
        except Exception as err:
            logger.warning("decoding an upload failed with %s", type(err).__name__)
            raise _input_error("Could not read the uploaded file as a PNG, JPEG or DICOM image.") from None

    def interpret(self, path: str | None) -> dict:
        """`model.interpret` of one uploaded image: image size, 29 regions with boxes and scores, findings."""
        return self.model.interpret(self.read_upload(path), self.processor)[0]

    def interpret_and_delete(self, upload: dict | str | None) -> dict:
        """`/interpret`: `interpret`, then the upload is deleted (the caller has the result; nothing reads it again)."""
        path = upload_path(upload)
        try:
            return self.interpret(path)
        finally:
            self.uploads.let_go(path)

    def _annotated(self, path: str, gray: np.ndarray, regions: list[dict], labels: list[str], scores: list[float]):
        """An update of the AnnotatedImage: a display copy of the upload `path` (its pixels `gray`, long side at most
        DISPLAY_SIDE) with one outline per region, coloured by `scores`."""
        height, width = gray.shape
        scale = min(1.0, DISPLAY_SIDE / max(height, width))
        image = Image.fromarray(np.round(gray * 255).astype(np.uint8))
        if scale < 1.0:
            image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
        display = self.display_path(path)
        display.parent.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=display.parent, suffix=".png", delete=False) as partial:
            image.save(partial, format="PNG")
        os.replace(partial.name, display)  # atomic: a concurrent redraw of the same upload never shows half a file
        shape = (image.height, image.width)
        border = max(2, round(max(shape) / 256))
        annotations = [
            (box_mask(shape, [v * scale for v in region["box"]], border), label)
            for region, label in zip(regions, labels)
        ]
        colours = {label: score_colour(score) for label, score in zip(labels, scores)}
        return gr.update(value=(str(display), annotations), color_map=colours)

    def analyse(self, upload: dict | str | None, request: gr.Request):
        """The page's upload: `interpret`'s result, the out-of-distribution warning, boxes coloured by each region's
        highest finding score, the region x finding table and the global findings; clears the region and free-text
        panels, which belong to the previous image. The page's previous upload is deleted."""
        path = upload_path(upload)
        self.uploads.show_on_page(request.session_hash if request else None, path)  # the request's hold is the page's
        if path is None:  # the upload was cleared
            return None, ood_warning(None), None, None, None, None, None
        gray = self.read_upload(path)
        result = self.model.interpret(gray, self.processor)[0]
        regions = result["regions"]
        highest = [max(r["scores"].values()) for r in regions]
        annotated = self._annotated(path, gray, regions, [r["name"] for r in regions], highest)
        rows = sorted(
            ([r["name"], finding, round(score, 4)] for r in regions for finding, score in r["scores"].items()),
            key=lambda row: row[2],
            reverse=True,
        )
        return result, ood_warning(result), annotated, rows, result["findings"], None, None

    def ask(self, upload: dict | str | None, question: str):
        """Score a free-text finding in every region; the scores become the boxes' labels and colours."""
        path = upload_path(upload)
        finding = " ".join((question or "").split())
        if not finding:
            raise _input_error("Type a finding to ask about, e.g. 'pleural effusion'.")
        if len(finding) > MAX_QUESTION_CHARS:
            raise _input_error(f"Keep the finding under {MAX_QUESTION_CHARS} characters.")
        if path is None:
            raise _input_error("Upload a chest X-ray first.")
        gray = self.read_upload(path)
        result = self.model.interpret(gray, self.processor, findings=[finding])[0]
        regions = result["regions"]
        scores = [r["scores"][finding] for r in regions]
        labels = [f"{r['name']}: {s:.2f}" for r, s in zip(regions, scores)]
        annotated = self._annotated(path, gray, regions, labels, scores)
        per_region = gr.update(
            value={r["name"]: s for r, s in zip(regions, scores)},
            label=f"'{finding}' per region (whole image: {result['findings'][finding]:.2f})",
        )
        return annotated, per_region

    def show_region(self, result: dict | None, event: gr.SelectData):
        """The selected region's score for every finding."""
        if result is None:
            return None
        region = result["regions"][event.index]
        return gr.update(value=region["scores"], label=f"{region['name']}: finding scores")

    # ------------------------------------------------------------------------------------------ layout
    def build(self) -> gr.Blocks:
        ttl = self.settings.file_ttl_s
        with gr.Blocks(title="Anatomy-VLM", analytics_enabled=False, delete_cache=(min(60, ttl), ttl)) as demo:
            gr.Markdown(
                "# Anatomy-VLM: chest X-ray anatomy and findings\n"
                "Upload a frontal chest X-ray (PNG, JPEG or DICOM). The model finds 29 anatomical regions and "
                "scores each finding in each region zero-shot. Box colour: the region's highest finding score "
                "(green low, red high); click a region in the legend for its scores. Uploads are deleted when you "
                f"upload another, close the page, or after {ttl // 60} minutes."
            )
            gr.Markdown(self.notice, elem_id="model-notice")
            warning = gr.Markdown(visible=False, elem_id="ood-warning")
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="Chest X-ray (PNG, JPEG or DICOM)", type="filepath")
                    if self.examples:
                        gr.Examples(examples=[[p] for p in self.examples], inputs=[upload], label="Phantom examples")
                    question = gr.Textbox(label="Ask about any finding", placeholder="e.g. pleural effusion")
                    ask_button = gr.Button("Score this finding per region")
                    question_scores = gr.Label(label="Free-text finding per region", num_top_classes=5)
                    findings = gr.Label(label="Whole-image findings", num_top_classes=8)
                with gr.Column(scale=2):
                    annotated = gr.AnnotatedImage(label="Anatomical regions", format="png", elem_id="regions")
                    region_scores = gr.Label(label="Selected region", num_top_classes=8)
            table = gr.Dataframe(
                headers=["region", "finding", "score"],
                datatype=["str", "str", "number"],
                label="Region x finding scores, highest first",
                interactive=False,
                elem_id="region-table",
            )
            with gr.Accordion("JSON (what the /interpret API returns)", open=False):
                result = gr.JSON(label="interpret")
            with gr.Group(visible=False):  # the public API's own input and output, never shown on the page
                api_image = gr.File(label="Chest X-ray (PNG, JPEG or DICOM)", type="filepath")
                api_result = gr.JSON(label="interpret")

            api_image.change(
                self.interpret_and_delete,
                api_image,
                api_result,
                api_name="interpret",
                concurrency_id=MODEL_QUEUE,
                preprocess=False,
                validator=self.hold_upload,
            )
            upload.change(
                self.analyse,
                upload,
                [result, warning, annotated, table, findings, region_scores, question_scores],
                api_visibility="private",
                concurrency_id=MODEL_QUEUE,
                preprocess=False,
                validator=self.hold_upload,
            )
            gr.on(
                [question.submit, ask_button.click],
                self.ask,
                [upload, question],
                [annotated, question_scores],
                api_visibility="private",
                concurrency_id=MODEL_QUEUE,
                preprocess=False,
            )
            annotated.select(self.show_region, result, region_scores, api_visibility="private")
            demo.unload(self.end_session)
        return demo


def launch(settings: Settings | None = None, **launch_kwargs) -> tuple[gr.Blocks, AnatomyVLMSpace]:
    """Build the app and serve it; `launch_kwargs` go to `Blocks.launch` (e.g. `prevent_thread_lock=True`)."""
    settings = settings or Settings.from_env()
    space = AnatomyVLMSpace(settings)
    demo = space.build().queue(default_concurrency_limit=settings.concurrency, max_size=settings.max_queue)
    demo.launch(
        max_file_size=int(settings.max_upload_mb * 2**20),
        allowed_paths=[str(space.examples_dir)],
        **launch_kwargs,
    )
    return demo, space


def threads_per_request(concurrency: int) -> int:
    """The cores each of `concurrency` simultaneous requests gets: oversubscribed torch threads spin-wait and
    make every request several times slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // concurrency)


def configure_process(settings: Settings):
    """Process-wide set-up of the served app; `launch` leaves it out, as tests and benchmarks share its process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
    torch.set_num_threads(threads_per_request(settings.concurrency))
    # pydicom's validation warnings quote element values ("Invalid value for VR DA: '<birth date>'") whenever an
    # element is read. The app reads only pixel and geometry elements; this keeps the log clean of anything else.
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def main():
    settings = Settings.from_env()
    configure_process(settings)
    try:
        launch(settings)
    except CheckpointNotFoundError as err:
        sys.exit(str(err))


if __name__ == "__main__":
    main()
