"""Continued training from a Hydra config (conf/train.yaml), NeMo style, with key=value overrides:

    python examples/train.py restore_from=moe.nemo data.data_prefix=[data/stdlib_text_document] trainer.max_steps=200

does the same as `nemo-upcycle train restore_from=moe.nemo ...`.
"""

import sys

from nemo.core.config import hydra_runner
from omegaconf import DictConfig

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.train.run import train


@hydra_runner(config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        result = train(cfg)
    except UpcycleError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"trained {result.steps} steps in {result.seconds:.1f} s -> {result.nemo_path}")


if __name__ == "__main__":
    main()
