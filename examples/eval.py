"""MMLU evaluation from a Hydra config (conf/eval.yaml), NeMo style, with key=value overrides:

    python examples/eval.py models=[dense.nemo,moe.nemo] data_dir=/data/mmlu limit=20

does the same as `nemo-upcycle eval dense.nemo moe.nemo --data-dir /data/mmlu --limit 20`.
"""

import sys

from nemo.core.config import hydra_runner
from omegaconf import DictConfig, OmegaConf

from nemo_upcycle.cli import sigterm_unwinds
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.eval.runner import EvalOptions, run_eval


@hydra_runner(config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        with sigterm_unwinds():
            print(run_eval(EvalOptions.from_dict(OmegaConf.to_container(cfg, resolve=True))))
    except UpcycleError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
