"""CPU latency of `interpret` on one chest X-ray with the default small model, and of the Space's request path.

    python -m train.bench.interpret [--model DIR] [--runs 10] [--threads N] [--concurrent 40]

Uses `outputs/quickstart/model` when it exists; otherwise saves the model of `configuration/train/quickstart.yaml`
with a random vision tower to a temporary folder: latency does not depend on training.
Prints the first `interpret` of a freshly loaded checkpoint with and without its precomputed prompt embeddings
(`prompt_embeds.safetensors`), medians over `--runs` calls after a warm-up, and the p50 / p95 latency of
`--concurrent` simultaneous `/interpret` requests; asserts nothing.
"""

import argparse
import importlib.util
import itertools
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import numpy as np
import torch
from gradio_client import Client, handle_file
from PIL import Image
from transformers import AutoModel, AutoProcessor

from modeling_anatomy_vlm import AnatomyVLMModel, AnatomyVLMProcessor
from modeling_anatomy_vlm.prompt_memo_anatomy_vlm import PROMPT_EMBEDS_NAME
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
    """The quickstart model as training saves it: weights, processor and precomputed prompt embeddings."""
    config = load_config(QUICKSTART_CONFIG).model_config()
    model, processor = AnatomyVLMModel.from_encoders(config), AnatomyVLMProcessor.from_model_config(config)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    model.save_prompt_embeds(directory, processor)
    return str(directory)


def first_interpret_s(checkpoint: Path, image: np.ndarray) -> float:
    """Seconds of the first `interpret` of a checkpoint loaded afresh, as the Space loads it."""
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    start = time.perf_counter()
    model.interpret(image, processor)
    return time.perf_counter() - start


def first_call_latency(model_path: str, directory: Path):
    """The first `interpret` of a fresh process's model, without and with precomputed prompt embeddings."""
    without = directory / "without-prompt-embeds"
    without.mkdir()
    for path in Path(model_path).iterdir():  # the checkpoint's files, linked, less its precomputed prompts
        if path.name != PROMPT_EMBEDS_NAME:
            (without / path.name).symlink_to(path.resolve())
    image = np.full((512, 512), 0.5, dtype=np.float32)
    cold = first_interpret_s(without, image)
    with_embeds = directory / "with-prompt-embeds"
    shutil.copytree(without, with_embeds, symlinks=True)
    model = AutoModel.from_pretrained(with_embeds, trust_remote_code=True)
    model.save_prompt_embeds(with_embeds, AutoProcessor.from_pretrained(with_embeds, trust_remote_code=True))
    warm = first_interpret_s(with_embeds, image)
    prompts = len(model.config.findings) * (1 + 2 * len(model.config.region_names))
    print(f"first interpret of a freshly loaded checkpoint ({len(model.config.findings)} findings, {prompts} "
          f"prompts): {cold:.2f} s embedding the prompts, {warm:.2f} s with {PROMPT_EMBEDS_NAME}")


def concurrent_latency(client: Client, image: str, count: int, concurrency: int):
    """p50 / p95 latency of `count` `/interpret` requests sent at once."""
    start = time.perf_counter()

    def request() -> float:
        client.predict(handle_file(image), api_name="/interpret")
        return time.perf_counter() - start

    with ThreadPoolExecutor(count) as pool:
        latencies = list(pool.map(lambda _: request(), range(count)))
    p50, p95 = np.percentile(latencies, [50, 95])
    print(f"{count} concurrent /interpret requests (the app runs {concurrency} at once): "
          f"p50 {p50:.2f} s, p95 {p95:.2f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: outputs/quickstart/model if built)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--concurrent", type=int, default=40, help="simultaneous /interpret requests (0: skip)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-interpret-") as tmp:
        app = load_space_app()
        model_path = args.model or (str(app.DEFAULT_MODEL) if app.DEFAULT_MODEL.exists() else None)
        if model_path is None:
            print(f"outputs/quickstart/model not built: saving the {QUICKSTART_CONFIG.name} model with random weights")
            model_path = small_checkpoint(Path(tmp) / "model")
        first_call_latency(model_path, Path(tmp))
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
            if args.concurrent:
                concurrent_latency(client, image, args.concurrent, space.settings.concurrency)

            def analyse_for_browser():  # the page's upload event, including gradio's encoding of the 29 masks
                annotated = space.analyse(image, None)[2]
                gr.AnnotatedImage(color_map=annotated["color_map"], format="png").postprocess(annotated["value"])

            analyse_ms = median_ms(analyse_for_browser, args.runs)
            print(f"page upload event (interpret, boxes encoded for the browser, table, findings): "
                  f"median {analyse_ms:.0f} ms")
            questions = (f"finding number {i}" for i in itertools.count())  # new text: its 59 prompts get embedded
            new_ms = median_ms(lambda: space.ask(image, next(questions)), args.runs)
            repeat_ms = median_ms(lambda: space.ask(image, "rib fracture"), args.runs)
            print(f"free-text question: new text median {new_ms:.0f} ms, repeated text median {repeat_ms:.0f} ms")
        finally:
            demo.close()


if __name__ == "__main__":
    main()
