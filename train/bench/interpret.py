"""CPU latency of `interpret` on one chest X-ray with the default small model, and of the Space's request path.

    python -m train.bench.interpret [--model DIR] [--runs 10] [--threads N]

Uses `outputs/quickstart/model` when it exists; otherwise saves the model of `configuration/train/quickstart.yaml`
with a random vision tower to a temporary folder: latency does not depend on training.
Prints medians over `--runs` calls after a warm-up; asserts nothing.
"""

import argparse
import importlib.util
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import torch
from gradio_client import Client, handle_file
from PIL import Image

from modeling_anatomy_vlm import AnatomyVLMModel, AnatomyVLMProcessor
from train.config import REPO_ROOT, load_config

QUICKSTART_CONFIG = REPO_ROOT / "configuration" / "train" / "quickstart.yaml"


def load_space_app():
    """space/app.py as a module (the Space is a folder of files, not a package)."""
    spec = importlib.util.spec_from_file_location("app", REPO_ROOT / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def small_checkpoint(directory: Path) -> str:
    config = load_config(QUICKSTART_CONFIG).model_config()
    AnatomyVLMModel.from_encoders(config).save_pretrained(directory)
    AnatomyVLMProcessor.from_model_config(config).save_pretrained(directory)
    return str(directory)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: outputs/quickstart/model if built)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-interpret-") as tmp:
        app = load_space_app()
        model_path = args.model or (str(app.DEFAULT_MODEL) if app.DEFAULT_MODEL.exists() else None)
        if model_path is None:
            print(f"outputs/quickstart/model not built: saving the {QUICKSTART_CONFIG.name} model with random weights")
            model_path = small_checkpoint(Path(tmp) / "model")
        start = time.perf_counter()
        demo, space = app.launch(
            app.Settings(model=model_path, concurrency=1),
            server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, ssr_mode=False,
        )
        image = space.examples[0]
        model, processor = space.model, space.processor
        vision = model.config.vision_config
        print(f"checkpoint {model_path}: ViT {vision.image_size} px, hidden {vision.hidden_size}, "
              f"{vision.num_hidden_layers} layers + MiniLM; torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"app start-up (load, examples, prompt warm-up, server): {time.perf_counter() - start:.1f} s")
        try:
            width, height = Image.open(image).size
            interpret_ms = median_ms(lambda: model.interpret(image, processor), args.runs)
            print(f"model.interpret, one {width}x{height} PNG, {len(model.config.findings)} findings: "
                  f"median {interpret_ms:.0f} ms over {args.runs} runs")

            client = Client(demo.local_url, verbose=False)
            client.predict(handle_file(image), api_name="/interpret")  # warm the HTTP path
            api_ms = median_ms(lambda: client.predict(handle_file(image), api_name="/interpret"), args.runs)
            print(f"/interpret through gradio_client (upload, queue, interpret, JSON): median {api_ms:.0f} ms")

            result = space.interpret(image)

            def render_for_browser():  # the UI step after /interpret, including gradio's encoding of the 29 masks
                annotated = space.render(image, result)[0]
                gr.AnnotatedImage(color_map=annotated["color_map"], format="png").postprocess(annotated["value"])

            render_ms = median_ms(render_for_browser, args.runs)
            print(f"UI render after /interpret (boxes encoded for the browser, table, findings): median {render_ms:.0f} ms")
            questions = (f"finding number {i}" for i in itertools.count())  # new text: its 59 prompts get embedded
            new_ms = median_ms(lambda: space.ask(image, next(questions)), args.runs)
            repeat_ms = median_ms(lambda: space.ask(image, "rib fracture"), args.runs)
            print(f"free-text question: new text median {new_ms:.0f} ms, repeated text median {repeat_ms:.0f} ms")
        finally:
            demo.close()


if __name__ == "__main__":
    main()
