"""submitit_local with a concurrency cap: upstream's LocalExecutor starts every cell at once."""

from __future__ import annotations

import os
from typing import Any, Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher


class CappedLocalLauncher(submitit_launcher.LocalLauncher):
    """Runs a sweep in waves of at most ``max_parallel`` cells (default 2, or $LSN_LOCAL_MAX_PARALLEL)."""

    def __init__(self, max_parallel: int | None = None, **params: Any) -> None:
        super().__init__(**params)
        self.max_parallel = max(1, int(max_parallel or os.environ.get("LSN_LOCAL_MAX_PARALLEL", 2)))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        returns: list[JobReturn] = []
        for start in range(0, len(job_overrides), self.max_parallel):
            wave = job_overrides[start:start + self.max_parallel]
            returns.extend(super().launch(wave, initial_job_idx + start))
        return returns
