"""``python -m lsn_exp [overrides]`` and ``python -m lsn_exp -m [sweep overrides]``."""

import sys

import hydra
from omegaconf import DictConfig

from lsn_exp.errors import UserError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from lsn_exp.job import run_job

    try:
        run_job(cfg)
    except UserError as err:
        print(f"lsn_exp: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
