"""Which lm-eval tasks exist: our task families (lsn_exp/tasks), lm-eval's own and a user's include path (no torch
here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lsn_exp import data
from lsn_exp.errors import UserError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


@dataclass(frozen=True)
class TaskFamily:
    """A downstream task family (eval.tasks): one lm-eval task per language it covers; or (kind ``lm_eval``)
    one lm-eval task or group by name, every per-document metric it logs."""

    name: str
    kind: str  # mc | mt | ppl
    metrics: tuple[str, ...]
    task_pattern: str  # {code}: our language code, {dataset}: the dataset's code for it
    lang_field: str | None  # Language attribute naming the dataset's code; None: every language
    exclude: tuple[str, ...] = ()
    local: bool = True  # our task dir (offline); False: lm-eval's tasks from the HF hub

    def langs(self) -> list[str]:
        """Our codes of the languages it covers, in the paper's order."""
        covered = data.LANG_ORDER if self.lang_field is None else data.covered(self.lang_field)
        return [code for code in covered if code not in self.exclude]

    def task(self, code: str) -> str:
        lang = data.language_registry()[code]
        return self.task_pattern.format(code=code, dataset=getattr(lang, self.lang_field) if self.lang_field else code)


TASK_FAMILIES = {
    "xcopa": TaskFamily("xcopa", "mc", ("acc",), "xcopa_local_{code}", "xcopa"),
    "xwinograd": TaskFamily("xwinograd", "mc", ("acc",), "xwinograd_local_{code}", "xwinograd"),
    "include": TaskFamily("include", "mc", ("acc",), "include_base_44_{dataset}", "include", local=False),
    "flores_mt": TaskFamily("flores_mt", "mt", ("chrf++", "bleu", "lang_share", "empty_share"), "flores_mt_{code}",
                        None, exclude=("en",)),
    "flores_ppl": TaskFamily("flores_ppl", "ppl", ("ll_per_token", "ppl", "bits_per_byte"), "flores_ppl_{code}", None),
}


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
