"""Train Anatomy-VLM (or a segmentation transfer) through the stages of a YAML config.

    python -m train.run --config configuration/train/quickstart.yaml [--set training.batch_size=16]
    accelerate launch train/run.py --config ... --resume latest        # or a checkpoint folder

Outputs in `training.output_dir`: `checkpoints/step_N/` (Accelerate state + trainer_state.json), TensorBoard logs
in `logs/`, the text cache, `train_config.yaml` (the config with every default filled in), and at the end
`model/` (model + processor, loadable with `AutoModel.from_pretrained(..., trust_remote_code=True)`) and, with
LoRA, `adapter/`. The loop is `train.engine`, the tasks `train.tasks`, the config's keys `train.config`.
"""

from __future__ import annotations

import argparse
import sys

from train.config import DEFAULT_CONFIG, ConfigError, load_config
from train.engine import train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a YAML under configuration/train/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training.batch_size=16 --set stages.2.steps=100")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder (output_dir/checkpoints/step_N)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: config error: {err}\n")
    train(config, args.resume)


if __name__ == "__main__":
    main(sys.argv[1:])
