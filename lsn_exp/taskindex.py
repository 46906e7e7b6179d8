"""Which lm-eval tasks exist: ours (lsn_exp/tasks), lm-eval's own and a user's include path (no torch here)."""

from __future__ import annotations

from pathlib import Path

from lsn_exp.errors import UserError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def check_lm_eval_tasks(names: list[str], include_path: str | None, ours: list[str]) -> None:
    """Every name that is not one of ``ours`` (our task families) must be an lm-eval task or group, lm-eval's
    own or include_path's."""
    if not names:
        return
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
    unknown = [n for n in names if n not in set(TaskManager(include_path=paths, include_defaults=True).all_tasks)]
    if unknown:
        where = "lm-eval's" + (f" or {include_path}'s" if include_path else " (add yours with eval.include_path)")
        raise UserError(f"eval.tasks has {unknown}: neither one of {', '.join(ours)} nor one of {where} "
                        f"tasks or groups")
