"""Anatomy-VLM Space: upload a chest X-ray (PNG, JPEG or DICOM), see its 29 anatomical regions and the
zero-shot score of every finding in every region, and ask about any finding in free text.

Run it with `make space` (or `python space/app.py`). Settings come from the environment:

* `ANATOMY_VLM_MODEL`: checkpoint folder or Hub id (default: `outputs/quickstart/model`, made by
  `make quickstart`).
* `ANATOMY_VLM_MAX_UPLOAD_MB` (default 32), `ANATOMY_VLM_MAX_MEGAPIXELS` (default 50): input limits.
* `ANATOMY_VLM_CONCURRENCY` (default 2): requests the queue runs at once.

`/interpret` is the public API: one image file in, `model.interpret`'s dict out. Every UI step starts
from the uploaded file, so the app keeps no per-user state. Patient data stays out of sight: DICOM files
contribute pixels only, and error messages and logs never name the uploaded file.
"""

import colorsys
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_MODEL = ROOT / "outputs" / "quickstart" / "model"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DICOM_MAGIC_OFFSET = 128  # "DICM" follows a 128-byte preamble
DISPLAY_SIDE = 768  # long side of the image the boxes are drawn on
BOX_FILL_ALPHA = 0.03  # faint fill, so overlapping boxes keep the film readable
MAX_QUESTION_CHARS = 120
NUM_EXAMPLES = 3

logger = logging.getLogger("anatomy_vlm.space")


class CheckpointNotFoundError(FileNotFoundError):
    """No usable Anatomy-VLM checkpoint where the settings point."""


@dataclass(frozen=True)
class Settings:
    model: str = str(DEFAULT_MODEL)
    max_upload_mb: float = 32.0
    max_megapixels: float = 50.0
    concurrency: int = 2

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ.get
        return cls(
            model=env("ANATOMY_VLM_MODEL", str(DEFAULT_MODEL)),
            max_upload_mb=float(env("ANATOMY_VLM_MAX_UPLOAD_MB", cls.max_upload_mb)),
            max_megapixels=float(env("ANATOMY_VLM_MAX_MEGAPIXELS", cls.max_megapixels)),
            concurrency=int(env("ANATOMY_VLM_CONCURRENCY", cls.concurrency)),
        )


def _input_error(message: str) -> gr.Error:
    """A message for the user; not printed to the server log (it is about their file, not a fault)."""
    return gr.Error(message, print_exception=False)


def load_checkpoint(name_or_path: str):
    """`(model, processor)` from a checkpoint folder or Hub id, with a message that says what to do if absent."""
    is_local = Path(name_or_path).exists()
    if not is_local and not HUB_ID.match(name_or_path):
        hint = "run `make quickstart` to build it" if Path(name_or_path) == DEFAULT_MODEL else "check ANATOMY_VLM_MODEL"
        raise CheckpointNotFoundError(
            f"No Anatomy-VLM checkpoint at {name_or_path}: {hint}, or set ANATOMY_VLM_MODEL to a checkpoint "
            "folder or Hub id (`make quickstart` builds the default one at outputs/quickstart/model)."
        )
    try:
        model = AutoModel.from_pretrained(name_or_path, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=True)
    except OSError as err:
        raise CheckpointNotFoundError(
            f"Could not load an Anatomy-VLM checkpoint from {name_or_path} ({err}). Run `make quickstart` to "
            "build the default one, or set ANATOMY_VLM_MODEL to a checkpoint folder or Hub id."
        ) from err
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor


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


class AnatomyVLMSpace:
    """The model, its processor and the handlers behind each UI element and the `/interpret` endpoint."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.model, self.processor = load_checkpoint(settings.model)
        # The checkpoint's own loader, so the app reads files exactly as the model's processor does.
        self.load_grayscale = sys.modules[type(self.processor.image_processor).__module__].load_grayscale
        self._examples_tmp = tempfile.TemporaryDirectory(prefix="anatomy-vlm-examples-")  # removed at exit
        self.examples_dir = Path(self._examples_tmp.name)
        self.examples = render_examples(self.examples_dir)
        self._warm_up()

    def _warm_up(self):
        """Embed the default prompts now (one batched text-tower pass), so the first request only runs the image side."""
        start = time.perf_counter()
        image = self.examples[0] if self.examples else np.full((256, 256), 0.5, dtype=np.float32)
        self.model.interpret(image, self.processor)
        logger.info("warm-up took %.1f s", time.perf_counter() - start)

    # ------------------------------------------------------------------------------------------ handlers
    def read_upload(self, path: str | None) -> np.ndarray:
        """The uploaded file as float32 `[H, W]` grayscale in [0, 1], or a `gr.Error` saying what is wrong."""
        if path is None:
            raise _input_error("No image given: upload a chest X-ray (PNG, JPEG or DICOM).")
        check_upload(path, int(self.settings.max_upload_mb * 2**20), int(self.settings.max_megapixels * 1e6))
        try:
            return self.load_grayscale(path)
        except ValueError as err:  # ImageLoadError: its message starts with the path, which we do not echo
            reason = str(err).removeprefix(f"{path}: ").replace(path, "the file")
            raise _input_error(f"Could not use the uploaded file: {reason}.") from None
        except Exception as err:
            logger.warning("decoding an upload failed with %s", type(err).__name__)
            raise _input_error("Could not read the uploaded file as a PNG, JPEG or DICOM image.") from None

    def interpret(self, path: str | None) -> dict | None:
        """`model.interpret` of one uploaded image: image size, 29 regions with boxes and scores, findings."""
        if path is None:  # the UI's upload was cleared
            return None
        return self.model.interpret(self.read_upload(path), self.processor)[0]

    def _display(self, path: str) -> tuple[np.ndarray, float]:
        """uint8 copy of the upload, long side at most DISPLAY_SIDE, and its scale from original pixels."""
        gray = self.read_upload(path)
        height, width = gray.shape
        scale = min(1.0, DISPLAY_SIDE / max(height, width))
        image = Image.fromarray(np.round(gray * 255).astype(np.uint8))
        if scale < 1.0:
            image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
        return np.asarray(image), scale

    def _annotated(self, path: str, regions: list[dict], labels: list[str], scores: list[float]) -> dict:
        """An update of the AnnotatedImage: the upload with one outline per region, coloured by `scores`."""
        image, scale = self._display(path)
        border = max(2, round(max(image.shape) / 256))
        annotations = [
            (box_mask(image.shape, [v * scale for v in region["box"]], border), label)
            for region, label in zip(regions, labels)
        ]
        colours = {label: score_colour(score) for label, score in zip(labels, scores)}
        return gr.update(value=(image, annotations), color_map=colours)

    def render(self, path: str | None, result: dict | None):
        """Boxes coloured by each region's highest finding score, the region x finding table, global findings;
        clears the region and free-text panels, which belong to the previous image."""
        if path is None or result is None:
            return None, None, None, None, None
        regions = result["regions"]
        annotated = self._annotated(
            path, regions, [r["name"] for r in regions], [max(r["scores"].values()) for r in regions]
        )
        rows = sorted(
            ([r["name"], finding, round(score, 4)] for r in regions for finding, score in r["scores"].items()),
            key=lambda row: row[2],
            reverse=True,
        )
        return annotated, rows, result["findings"], None, None

    def ask(self, path: str | None, question: str):
        """Score a free-text finding in every region; the scores become the boxes' labels and colours."""
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
        annotated = self._annotated(path, regions, [f"{r['name']}: {s:.2f}" for r, s in zip(regions, scores)], scores)
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
        with gr.Blocks(title="Anatomy-VLM") as demo:
            gr.Markdown(
                "# Anatomy-VLM: chest X-ray anatomy and findings\n"
                "Upload a frontal chest X-ray (PNG, JPEG or DICOM). The model finds 29 anatomical regions and "
                "scores each finding in each region zero-shot. Box colour: the region's highest finding score "
                "(green low, red high); click a region in the legend for its scores. "
                "**Research demo, not for clinical use.**"
            )
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

            upload.change(self.interpret, upload, result, api_name="interpret").success(
                self.render,
                [upload, result],
                [annotated, table, findings, region_scores, question_scores],
                api_visibility="private",
            )
            gr.on(
                [question.submit, ask_button.click],
                self.ask,
                [upload, question],
                [annotated, question_scores],
                api_visibility="private",
            )
            annotated.select(self.show_region, result, region_scores, api_visibility="private")
        return demo


def launch(settings: Settings | None = None, **launch_kwargs) -> tuple[gr.Blocks, AnatomyVLMSpace]:
    """Build the app and serve it; `launch_kwargs` go to `Blocks.launch` (e.g. `prevent_thread_lock=True`)."""
    settings = settings or Settings.from_env()
    space = AnatomyVLMSpace(settings)
    demo = space.build().queue(default_concurrency_limit=settings.concurrency)
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
