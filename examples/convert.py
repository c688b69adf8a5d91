"""Upcycling from a Hydra config (conf/upcycle.yaml), NeMo style, with key=value overrides:

    python examples/convert.py input=dense.nemo output=moe.nemo recipe.shorthand=E8G8T8
    python examples/convert.py input=dense.nemo output=moe.nemo recipe.granularity=8 recipe.topk=8 verify=0

does the same as `nemo-upcycle convert dense.nemo moe.nemo --recipe E8G8T8`.
"""

import sys

from nemo.core.config import hydra_runner
from omegaconf import DictConfig, OmegaConf

from nemo_upcycle.cli import sigterm_unwinds
from nemo_upcycle.convert import convert_from_config
from nemo_upcycle.errors import UpcycleError


@hydra_runner(config_path="../conf", config_name="upcycle")
def main(cfg: DictConfig) -> None:
    try:
        with sigterm_unwinds():
            summary = convert_from_config(OmegaConf.to_container(cfg, resolve=True))
    except UpcycleError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(summary.table())
    if summary.verify and str(summary.verify.get("status", "")).startswith("FAILED"):
        sys.exit(1)


if __name__ == "__main__":
    main()
