"""`make quickstart`: generate phantom chest X-rays, build the default small model offline, save it, interpret.

Until the staged trainer lands this saves the *untrained* model (pretrained MiniLM text tower, random vision
tower): it shows every mechanism end to end (data layout, checkpoint, remote-code loading, `interpret`), not
meaningful scores.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modeling_anatomy_vlm import AnatomyVLMConfig, AnatomyVLMModel, AnatomyVLMProcessor  # noqa: E402
from train.data.phantom import generate_dataset  # noqa: E402

# ViT-S/16-sized tower at 224 px: small enough for this CPU.
SMALL_VISION = dict(
    model_type="vit", image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=6,
    num_attention_heads=6, intermediate_size=1536,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "phantom-quickstart"))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "quickstart"))
    parser.add_argument("--n", type=int, default=32, help="phantom images to generate (cached)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data_dir = generate_dataset(args.data, n=args.n, seed=args.seed)
    config = AnatomyVLMConfig(vision_config=SMALL_VISION, projection_dim=256)
    model = AnatomyVLMModel.from_encoders(config).eval()
    processor = AnatomyVLMProcessor.from_model_config(config)
    model_dir = Path(args.out) / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    print(f"saved model + processor to {model_dir} (load with AutoModel/AutoProcessor, trust_remote_code=True)")

    image = sorted((Path(data_dir) / "mimic-cxr-jpg" / "files").rglob("*.jpg"))[0]
    findings = ["pleural effusion", "pneumothorax", "enlarged cardiac silhouette"]
    result = model.interpret([image], processor, findings=findings)[0]
    print(f"\ninterpret({image.relative_to(data_dir)}) -> image_size {result['image_size']}  [UNTRAINED weights]")
    print(f"{'region':<26} {'box (x1, y1, x2, y2)':<30} " + " ".join(f"{f[:12]:>12}" for f in findings))
    for region in result["regions"]:
        box = ", ".join(f"{v:.0f}" for v in region["box"])
        print(f"{region['name']:<26} {box:<30} " + " ".join(f"{region['scores'][f]:>12.3f}" for f in findings))
    print("global: " + ", ".join(f"{f} {p:.3f}" for f, p in result["findings"].items()))


if __name__ == "__main__":
    main()
