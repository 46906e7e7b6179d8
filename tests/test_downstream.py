"""Downstream evaluation: request formats checked by hand (XCOPA connectives, XWinograd partial scoring,
FLORES prompts), every local task on a tiny model offline, the cached baseline and a no-op patch,
batch-size-independent translation scores, metrics against sacrebleu, matrices (tiny models, CPU)."""

from __future__ import annotations

import csv
import importlib.util
import math
from dataclasses import replace

import numpy as np
import pytest
import sacrebleu
import torch
from conftest import synthetic_neurons

from lsn_exp import data, downstream, lmeval, metrics, outputs
from lsn_exp.cache import CacheStore
from lsn_exp.engine import engine_of
from lsn_exp.errors import UserError
from lsn_exp.results import DownstreamResult, MetricDelta, TaskScore
from lsn_exp.settings import eval_settings
from lsn_exp.specs import PatchSpec, parse_factor
from lsn_exp.taskindex import TASK_FAMILIES

LOCAL = ["xcopa", "xwinograd", "flores_mt", "flores_ppl"]


def requests(data_root, task: str, n: int = 1, **metadata) -> list[list[tuple]]:
    """The request arguments of the first ``n`` documents of ``task``, grouped per document."""
    manager = lmeval.task_manager(metadata={"data_root": str(data_root), **metadata})
    instances = lmeval.build_instances(manager.load([task])["tasks"][task])
    grouped: dict[int, list] = {}
    for inst in sorted(instances, key=lambda i: (i.doc_id, i.idx)):
        grouped.setdefault(inst.doc_id, []).append(inst.args)
    return [grouped[i] for i in range(n)]


# --- request formats, worked out by hand ------------------------------------------------------------------

def test_connectives_are_lm_evals():
    from pathlib import Path

    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "xcopa" / "utils.py"
    spec = importlib.util.spec_from_file_location("lm_eval_xcopa_utils", path)
    theirs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs)
    ours = importlib.util.spec_from_file_location("xcopa_local_utils",
                                                  lmeval.TASKS_DIR / "xcopa_local" / "utils.py")
    mine = importlib.util.module_from_spec(ours)
    ours.loader.exec_module(mine)
    assert sorted(mine.CONNECTIVES) == sorted(TASK_FAMILIES["xcopa"].langs()) == sorted(
        name[len("doc_to_text_"):] for name in dir(theirs) if name.startswith("doc_to_text_"))
    for lang, connectives in mine.CONNECTIVES.items():
        assert getattr(theirs, f"doc_to_text_{lang}").keywords["connector"] == connectives


def test_xcopa_requests_by_hand(data_root):
    # row 0 of test: "cause" in id/zh/tr, "effect" in th (the source data's quirk, kept as lm-eval keeps it)
    assert requests(data_root, "xcopa_local_id")[0] == [
        ("Barang itu dikemas dalam bungkus gelembung karena", " barang itu rapuh."),
        ("Barang itu dikemas dalam bungkus gelembung karena", " barang itu kecil.")]
    assert requests(data_root, "xcopa_local_zh")[0] == [("该物品用气泡包装纸包着 因为", " 它很易碎。"),
                                                        ("该物品用气泡包装纸包着 因为", " 它很小。")]
    # th premises have no full stop: lm-eval's [:-1] drops the last letter all the same
    assert requests(data_root, "xcopa_local_th")[0] == [("สิ่งของถูกห่อไว้ในพลาสติ ดังนั้น", " มันบอบบาง"),
                                                        ("สิ่งของถูกห่อไว้ในพลาสติ ดังนั้น", " มันเล็ก")]
    # row 1 is "effect": the two-word connective, and the choice's first letter lowercased
    doc1 = requests(data_root, "xcopa_local_tr", n=2)[1]
    assert [ctx.rsplit(" ", 2)[-2:] for ctx, _ in doc1] == [["bu", "yüzden"]] * 2
    assert all(cont[1].islower() and cont[0] == " " for _, cont in doc1)
    manager = lmeval.task_manager(metadata={"data_root": str(data_root)})
    task = manager.load(["xcopa_local_id"])["tasks"]["xcopa_local_id"]
    doc = next(iter(task.eval_docs))
    assert task.doc_to_target(doc) == 0 and task.config.output_type == "multiple_choice"


def test_xwinograd_partial_scoring_by_hand(data_root):
    # "multiple input": the options fill the blank in the contexts, the rest is one shared continuation
    assert requests(data_root, "xwinograd_local_en")[0] == [
        ("The city councilmen refused the demonstrators a permit because The city councilmen", " feared violence."),
        ("The city councilmen refused the demonstrators a permit because the demonstrators", " feared violence.")]
    assert requests(data_root, "xwinograd_local_ja")[0] == [("狙撃兵はテロリストを撃った。狙撃兵", " は悪漢だったからだ。"),
                                                            ("狙撃兵はテロリストを撃った。テロリスト", " は悪漢だったからだ。")]
    manager = lmeval.task_manager(metadata={"data_root": str(data_root)})
    tasks = manager.load(["xwinograd_local_en", "xwinograd_local_ja"])["tasks"]
    en, ja = (next(iter(tasks[name].eval_docs)) for name in ("xwinograd_local_en", "xwinograd_local_ja"))
    assert tasks["xwinograd_local_en"].doc_to_text(en) == 0  # answer "1": the gold is the first context
    assert tasks["xwinograd_local_ja"].doc_to_text(ja) == 1  # answer "2"
    assert {len(list(t.eval_docs)) for t in tasks.values()} == {2325, 959}


def test_flores_requests(data_root):
    (untargeted,), = requests(data_root, "flores_mt_ja")
    (targeted,), = requests(data_root, "flores_mt_ja", mt_prompt="targeted")
    source = "\"We now have 4-month-old mice that are non-diabetic that used to be diabetic,\" he added."
    assert untargeted == (f"Translate the following English sentence.\nEnglish: {source}\nTranslation:",
                          {"until": [], "max_gen_toks": 50, "do_sample": False})
    assert "Japanese" not in untargeted[0]
    assert targeted[0] == f"Translate the following English sentence into Japanese.\nEnglish: {source}\nJapanese:"
    (ppl,), = requests(data_root, "flores_ppl_th")
    assert ppl == ((data_root / "flores200" / "devtest" / "tha_Thai.txt").read_text(encoding="utf-8").splitlines()[0],)
    dev = requests(data_root, "flores_ppl_en", flores_split="dev")[0][0][0]
    assert dev.startswith("On Monday, scientists from the Stanford University School of Medicine")


def test_mt_output_opening_with_a_newline_is_a_translation_not_empty(data_root):
    """Generation stops only at EOS; the prediction strips leading whitespace, then cuts at the first newline."""
    spec = importlib.util.spec_from_file_location("flores_mt_utils", lmeval.TASKS_DIR / "flores_mt" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"target": "Bonjour le monde.", "lang": "fr", "bleu_tokenize": metrics.bleu_tokenizer("fr")}
    out = utils.process_results(doc, ["\n\n Bonjour le monde.\nEnglish: next sentence"])
    assert out["chrf++"][0] == "Bonjour le monde." and out["empty_share"] == 0.0
    assert out["bleu"] == ("Bonjour le monde.", "Bonjour le monde.", "13a")
    assert utils.process_results(doc, [" \n \n"])["empty_share"] == 1.0
    task = lmeval.task_manager(metadata={"data_root": str(data_root)}).load(["flores_mt_fr"])["tasks"]["flores_mt_fr"]
    until = task.config.generation_kwargs["until"]
    assert "\n" not in until  # lm-eval adds EOS itself


def test_group_outputs_merge_subtasks_like_include():
    """INCLUDE runs as a group of subtasks (hub only): the group's documents are every subtask's, in order."""
    ref = downstream.TaskRef(TASK_FAMILIES["include"], "id", "include_base_44_indonesian")
    results = {"group_subtasks": {ref.name: ["sub_b", "sub_a"]},
               "groups": {ref.name: {"acc,none": 0.6}},
               "samples": {"sub_a": [{"doc_id": 1, "acc": 0.0}, {"doc_id": 0, "acc": 1.0}],
                           "sub_b": [{"doc_id": 0, "acc": 1.0}, {"doc_id": 1, "acc": 1.0}, {"doc_id": 2, "acc": 0.0}]}}
    out = downstream.outputs_from_samples(ref, results, tokenizer=None)
    assert out.keys == ["sub_a:0", "sub_a:1", "sub_b:0", "sub_b:1", "sub_b:2"]
    assert out.tensors["correct"].tolist() == [1.0, 0.0, 1.0, 1.0, 0.0] and out.lm_eval == {"acc": 0.6}
    assert isinstance(out, downstream.DocOutputs)
    stats = out.stats(ref)["acc"]
    assert metrics.metric_value("acc", stats.sum(0), "id") == pytest.approx(0.6)


def test_include_task_names_exist_in_lm_eval():
    from pathlib import Path

    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks" / "include" / "default"
    groups = {p.stem.lstrip("_") for p in root.glob("*/_include_base_44_*.yaml")}
    names = [ref.name for ref in downstream.plan(eval_settings({"tasks": ["include"]}))]
    assert len(names) == 13 and set(names) <= groups


# --- metrics ----------------------------------------------------------------------------------------------

def test_bleu_tokenizers_and_corpus_scores_match_sacrebleu():
    assert metrics.bleu_tokenizer("zh") == "zh" and metrics.bleu_tokenizer("fr") == "13a"
    assert metrics.bleu_tokenizer("ja") in ("ja-mecab", "char")
    assert metrics.bleu_tokenizer("th") in ("flores200", "char")
    preds = ["猫がマットの上に座った", "犬", ""]
    refs = ["猫はマットの上に座っていた", "その犬", "はい"]
    tok = metrics.bleu_tokenizer("ja")
    assert metrics.corpus_score("bleu", preds, refs, "ja") == pytest.approx(
        sacrebleu.corpus_bleu(preds, [refs], tokenize=tok).score, abs=1e-9)
    assert metrics.corpus_score("chrf++", preds, refs, "ja") == pytest.approx(
        sacrebleu.corpus_chrf(preds, [refs], word_order=2).score, abs=1e-9)


def test_compare_by_hand():
    rng = np.random.default_rng(0)
    now = np.c_[[1, 1, 0, 1], np.ones(4)]
    base = np.c_[[1, 0, 0, 0], np.ones(4)]
    cell = metrics.paired_delta("acc", now, base, "en", 100, rng)
    assert isinstance(cell, MetricDelta)
    assert cell.value == 0.75 and cell.base == 0.25 and cell.delta == 0.5
    assert cell.stderr == pytest.approx(np.std([1, 1, 0, 1], ddof=1) / 2)
    assert cell.delta_stderr == pytest.approx(np.std([0, 1, 0, 1], ddof=1) / 2)
    ppl = np.array([[-10.0, 5, 20], [-30.0, 10, 40]])  # ll, tokens, bytes
    cell = metrics.paired_delta("ppl", ppl, ppl, "en", 50, rng)
    assert cell.value == pytest.approx(math.exp(40 / 15)) and cell.delta == 0 and cell.delta_stderr == 0
    assert metrics.metric_value("bits_per_byte", ppl.sum(0), "en") == pytest.approx(40 / (60 * math.log(2)))


def test_rolling_loglikelihood_scores_the_sentence_after_one_bos(tiny):
    from lm_eval.api.instance import Instance

    text = "Le chat est assis sur le tapis."
    lm = engine_of(tiny).lm(4, rolling=True)
    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = [tiny.tokenizer.bos_token_id] + tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(tiny.model(torch.tensor([ids])).logits[0].double(), -1)
    expected = sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    assert ll == pytest.approx(expected, abs=1e-3)
    assert downstream.scored_tokens(tiny.tokenizer, text) == len(ids) - 1


# --- every local task on a tiny model, offline ------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tiny, data_root, tmp_path_factory):
    """All local families in every language they cover (limit 2) and INCLUDE, patched toward id."""
    store = CacheStore(tmp_path_factory.mktemp("store"))
    cfg = {"tasks": "all", "limit": 2, "bootstrap": 50}
    evaluator = downstream.DownstreamEvaluator(tiny, eval_settings(cfg), data_root, store)
    spec = PatchSpec.from_config({"neuron_set": "lape"}, parse_factor("pmax"), "id")
    out_dir = tmp_path_factory.mktemp("job")
    result, mt_rows = evaluator.score(synthetic_neurons(tiny, list(data.LANG_ORDER)), spec)
    tables = outputs.downstream_tables(result, mt_rows, out_dir)
    return {"evaluator": evaluator, "result": result, "mt_rows": mt_rows, "tables": tables, "store": store,
            "cfg": cfg}


def test_every_local_task_runs_offline_and_include_is_skipped(run):
    result = run["result"]
    assert isinstance(result, DownstreamResult)
    expected = {ref.name for name in LOCAL for ref in downstream.plan(eval_settings({"tasks": [name]}))}
    assert set(result.tasks) == expected and len(expected) == 11 + 6 + 17 + 18
    assert "hub" in result.skipped["include"] and "offline" in result.skipped["include"]
    for name, task in result.tasks.items():
        assert isinstance(task, TaskScore)
        assert task.n == 2 and task.self_language == (task.lang == "id")
        for metric in TASK_FAMILIES[task.family].metrics:
            cell = task.metrics[metric]
            assert cell.value is not None and cell.base is not None, (name, metric)
            assert cell.delta == pytest.approx(cell.value - cell.base)
    assert result.tasks["flores_mt_ja"].bleu_tokenizer == metrics.bleu_tokenizer("ja")
    assert any(abs(t.metrics["ll_per_token"].delta) > 0 for t in result.tasks.values()
               if t.family == "flores_ppl")  # the patch changes the model
    summary = result.summary()
    assert summary["xwinograd"]["acc"]["self"] is None and summary["xwinograd"]["acc"]["n_cross"] == 6
    assert summary["flores_ppl"]["ppl"]["n_cross"] == 17 and summary["xcopa"]["acc"]["n_cross"] == 10
    assert summary["flores_mt"]["chrf++"]["self"] == result.tasks["flores_mt_id"].metrics["chrf++"].delta
    assert not any(run["evaluator"].unpatched_cached.values())
    assert not any(t.unpatched_cached for t in result.tasks.values())
    rows = list(csv.DictReader(open(run["tables"]["downstream/tasks"])))
    assert len(rows) == 11 + 6 + 17 * 4 + 18 * 3
    assert len(run["mt_rows"]) == 17 * 2
    assert len(list(csv.DictReader(open(run["tables"]["downstream/mt_outputs"])))) == 17 * 2
    assert "| flores_mt | **id** | chrf++ |" in outputs.downstream_markdown(result)
    assert "| flores_mt | **id** | empty_share |" in outputs.downstream_markdown(result)
    assert 0 <= result.tasks["flores_mt_id"].metrics["empty_share"].base <= 1


def test_our_scores_equal_lm_evals_aggregates(run):
    evaluator = run["evaluator"]
    checked = 0
    for ref in evaluator.refs:
        out = evaluator.unpatched[ref.name]
        stats = out.stats(ref)
        for metric, theirs in out.lm_eval.items():
            assert metrics.metric_value(metric, stats[metric].sum(0), ref.lang) == pytest.approx(
                theirs, rel=1e-6, abs=1e-9), (ref.name, metric)
            checked += 1
    assert checked == 11 + 6 + 17 * 4 + 18


def test_cached_baseline_and_noop_patch(run, tiny, data_root, tmp_path):
    cfg = {**run["cfg"], "tasks": ["xcopa", "flores_mt", "flores_ppl"], "langs": ["id", "ja", "th"]}
    evaluator = downstream.DownstreamEvaluator(tiny, eval_settings(cfg), data_root, run["store"])
    assert evaluator.unpatched_cached and all(evaluator.unpatched_cached.values())
    noop = PatchSpec.from_config({"neuron_set": "lape"}, parse_factor(1), "id")
    result, _ = evaluator.score(synthetic_neurons(tiny, list(data.LANG_ORDER)), noop)
    assert set(result.tasks) == {"xcopa_local_id", "xcopa_local_th", "flores_mt_id", "flores_mt_ja", "flores_mt_th",
                                 "flores_ppl_id", "flores_ppl_ja", "flores_ppl_th"}
    assert all(t.unpatched_cached for t in result.tasks.values())
    for name, task in result.tasks.items():
        for metric, cell in task.metrics.items():
            # the cached baseline was scored in other batches (all tasks at once): fp32 noise only
            assert cell.delta == pytest.approx(0, abs=1e-4), (name, metric, cell)
    # a different limit is a different baseline
    narrower = eval_settings({**cfg, "tasks": ["xcopa"], "langs": ["id"], "limit": 3})
    other = downstream.DownstreamEvaluator(tiny, narrower, data_root,
                                           run["store"])
    assert other.unpatched_cached == {"xcopa_local_id": False}


def test_translation_scores_do_not_depend_on_batch_size(tiny, data_root):
    cfg = {"tasks": ["flores_mt"], "langs": ["fr", "ja", "th", "zh"], "limit": 4}
    runs = {bs: downstream.DownstreamEvaluator(tiny, eval_settings({**cfg, "batch_size": bs}), data_root, None)
            for bs in (1, 8)}
    assert runs[1].lm.batch_size == 1 and runs[8].lm.batch_size == 8
    for ref in runs[1].refs:
        one, eight = runs[1].unpatched[ref.name], runs[8].unpatched[ref.name]
        assert one.texts == eight.texts
        for metric in ref.family.metrics:
            s1, s8 = one.stats(ref)[metric], eight.stats(ref)[metric]
            assert metrics.metric_value(metric, s1.sum(0), ref.lang) == metrics.metric_value(
                metric, s8.sum(0), ref.lang)


# --- settings, matrices -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, needle", [
    ({"tasks": []}, "eval.tasks"),
    ({"limit": 0.5}, "eval.limit"),
    ({"limits": {"flores_mt": 0}}, "eval.limits.flores_mt"),
    ({"limits": {"wmt": 5}}, "eval.limits"),
    ({"langs": ["id", "xx"]}, "eval.langs"),
    ({"mt_prompt": "chat"}, "eval.mt_prompt"),
    ({"flores_split": "test"}, "eval.flores_split"),
])
def test_settings_errors_are_one_line(cfg, needle):
    with pytest.raises(UserError) as err:
        eval_settings(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_eval_config_group_composes():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lsn_exp import CONF_DIR

    has_eval = "eval" in str(OmegaConf.load(CONF_DIR / "config.yaml").defaults)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        default = compose("config", overrides=[("" if has_eval else "+") + "eval=default"])
        full = compose("config", overrides=[("" if has_eval else "+") + "eval=full"])
    s = eval_settings(default.eval)
    assert s.families == tuple(TASK_FAMILIES) and s.limit == 100 and s.mt_prompt == "untargeted"
    assert eval_settings(full.eval).limit is None


def test_matrices_from_a_sweep(run, tmp_path):
    base = run["result"]
    shifted = {name: replace(t, self_language=t.lang == "ja",
                             metrics={m: replace(c, delta=(c.delta or 0) + 1.0) for m, c in t.metrics.items()})
               for name, t in base.tasks.items()}
    other = replace(base, target="ja", tasks=shifted)
    # the summary follows the tasks: ja is now the self language
    assert other.summary()["flores_mt"]["chrf++"]["self"] == shifted["flores_mt_ja"].metrics["chrf++"].delta
    out = outputs.downstream_matrices([other, base], tmp_path, title="tiny pmax")
    xcopa = out["matrices"]["xcopa/acc"]
    assert xcopa["cols"] == ["id", "ja"] and xcopa["rows"] == TASK_FAMILIES["xcopa"].langs()
    row = xcopa["rows"].index("th")
    assert xcopa["values"][row] == [base.tasks["xcopa_local_th"].metrics["acc"].delta,
                                    base.tasks["xcopa_local_th"].metrics["acc"].delta + 1.0]
    assert out["matrices"]["flores_mt/chrf++"]["rows"][0] == "nl"  # no English row for en->X
    for key, path in {**out["tables"], **out["images"]}.items():
        assert path.exists() and path.stat().st_size > 0, key
    assert "downstream/flores_mt_chrfpp/heatmap" in out["images"]
    lines = list(csv.reader(open(out["tables"]["downstream/xcopa_acc/matrix"])))
    assert lines[0] == ["task_lang\\patched", "id", "ja"] and len(lines) == 12
    self_cross = list(csv.DictReader(open(out["tables"]["downstream/self_cross"])))
    assert {r["patched"] for r in self_cross} == {"id", "ja"}
    with pytest.raises(UserError, match="one factor"):
        outputs.downstream_matrices([base, base], tmp_path)
