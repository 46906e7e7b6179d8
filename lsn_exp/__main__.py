"""``python -m lsn_exp [overrides]`` and ``python -m lsn_exp -m [sweep overrides]``."""

import errno

import hydra
from omegaconf import DictConfig

from lsn_exp.errors import UserError, exit_with

DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from lsn_exp.job import Launch, run_job

    try:
        run_job(cfg, Launch.from_hydra())
    except UserError as err:
        exit_with(str(err))
    except OSError as err:
        if err.errno not in DISK_ERRORS:
            raise
        exit_with(f"{err.strerror} writing {err.filename or 'a file'}: results.json was not written; free space "
                  "(or fix permissions) and run the same command again (cached work is kept)")


if __name__ == "__main__":
    main()
