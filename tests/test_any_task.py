"""Any lm-eval task under a patch: a user's task YAML from eval.include_path, paired with cached unpatched scores."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from lsn_exp.settings import eval_settings
from lsn_exp.downstream import plan, task_language
from lsn_exp.errors import UserError
from lsn_exp.report import build_report

DOCS = [{"question": "Le ciel est", "choices": ["bleu", "carré", "mardi"], "answer": 0},
        {"question": "Un chat a quatre", "choices": ["pattes", "roues", "lunes"], "answer": 0},
        {"question": "L'eau est", "choices": ["sèche", "mouillée", "ronde"], "answer": 1},
        {"question": "Deux plus deux font", "choices": ["cinq", "trois", "quatre"], "answer": 2}]


def user_task(root, name="my_mc_fr"):
    """What a researcher writes: a multiple-choice task on a local JSONL file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS))
    (root / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'docs.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return root


def test_task_names_carry_their_language():
    s = eval_settings({"tasks": ["xcopa", "xnli_fr", "belebele_ind_Latn", "arc_easy", "my_task"],
                       "task_langs": {"my_task": "ja"}})
    assert task_language("xnli_fr", s) == "fr" and task_language("belebele_ind_Latn", s) == "id"
    assert task_language("belebele_tha_Thai", s) == "th" and task_language("arc_easy", s) == ""
    assert task_language("my_task", s) == "ja"
    refs = plan(s)
    assert [r.name for r in refs if r.family.kind == "lm_eval"] == ["xnli_fr", "belebele_ind_Latn", "arc_easy",
                                                                    "my_task"]
    with pytest.raises(UserError, match="include_path=/nonexistent"):
        eval_settings({"tasks": ["x"], "include_path": "/nonexistent"})


@pytest.mark.slow  # a sweep of real jobs (about a minute): in `make test-slow`
def test_a_user_task_runs_under_a_patch_with_cached_unpatched_scores(tmp_path):
    tasks = user_task(tmp_path / "tasks")
    args = ("model=tiny", "stage=downstream", "lang=fr", "eval.tasks=[my_mc_fr,xcopa]", "eval.langs=[id]",
            "eval.limit=4", f"eval.include_path={tasks}", "identify.languages=[en,fr,ja]", "identify.max_tokens=300",
            "logger=none")
    first = run_cli(*args, f"hydra.run.dir={tmp_path}/sweep/a", timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    found = json.loads((tmp_path / "sweep" / "a" / "results.json").read_text())["results"]["downstream"]["tasks"]
    mine = found["my_mc_fr"]
    assert mine["lang"] == "fr" and mine["self_language"] and mine["n"] == 4
    assert set(mine["metrics"]) == {"acc", "acc_norm"}
    for metric in mine["metrics"].values():
        assert 0 <= metric["value"] <= 1 and metric["delta"] == pytest.approx(metric["value"] - metric["base"])
    assert "xcopa_local_id" in found  # ours beside it
    rows = (tmp_path / "sweep" / "a" / "downstream_tasks.csv").read_text()
    assert "my_mc_fr" in rows
    again = run_cli(*args, f"hydra.run.dir={tmp_path}/b", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((tmp_path / "b" / "results.json").read_text())["results"]["downstream"]["tasks"]["my_mc_fr"]
    assert second["unpatched_cached"] and second["metrics"] == mine["metrics"]
    report = build_report(tmp_path / "sweep").read_text()  # the first run as a sweep: the task is in its tables
    assert "my_mc_fr_acc_self" in report and "Downstream deltas" in report
    assert list((tmp_path / "sweep").glob("downstream_*/downstream_my_mc_fr_acc.csv"))


@pytest.mark.slow
def test_a_user_task_on_gemma(tmp_path):
    tasks = user_task(tmp_path / "tasks")
    result = run_cli("stage=downstream", "lang=fr", "eval.tasks=[my_mc_fr]", f"eval.include_path={tasks}",
                     "logger=none", f"hydra.run.dir={tmp_path}/g", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    mine = json.loads((tmp_path / "g" / "results.json").read_text())["results"]["downstream"]["tasks"]["my_mc_fr"]
    assert mine["n"] == 4 and mine["metrics"]["acc"]["base"] >= 0.5  # a 270M model knows the sky is blue
