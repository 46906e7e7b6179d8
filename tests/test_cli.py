"""The Hydra app as a user drives it: composition, dry runs, and one-line errors for bad input."""

from __future__ import annotations

import csv

import pytest
import yaml
from hydra import compose, initialize_config_dir

from lsn_exp import CONF_DIR
from lsn_exp.data import language_registry
from conftest import run_cli
from faultlib import fresh_cache

MODEL_NAMES = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def test_model_registry_is_complete():
    assert set(MODEL_NAMES) == {"gemma3_270m", "smollm2_135m", "qwen", "gemma", "seallm", "qwen_mini",
                                "gemma_mini", "seallm_mini", "llama", "tiny"}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_config_composes(name):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={name}"])
    model = cfg.model
    assert model.name == name
    assert model.source in {"hub", "gguf_package", "tiny"}
    for key in ("revision", "dtype", "device", "batch_size"):
        assert key in model, f"{name} lacks {key}"
    if model.source == "hub":
        assert "/" in model.id
    if model.source == "gguf_package":
        assert model.package and model.gguf_file.endswith(".gguf")


def test_language_registry_matches_the_data_readme(data_root):
    rows = list(csv.DictReader(open(data_root / "languages.tsv"), delimiter="\t"))
    registry = language_registry()
    assert len(registry) == 18 == len(rows)
    by_flores = {lang.flores: lang for lang in registry.values()}
    for row in rows:
        lang = by_flores[row["flores200"]]
        for field in ("xcopa", "xwinograd", "mlama"):
            expected = None if row[field] == "-" else row[field]
            assert getattr(lang, field) == expected, (lang.code, field)
        assert (data_root / "flores200" / "dev" / f"{lang.flores}.txt").exists()


def test_cfg_job_prints_the_composed_llama_job():
    result = run_cli("model=llama", "lang=id", "factor=5", "--cfg", "job", timeout=60)
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["model"]["id"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert cfg["lang"]["code"] == "id" and cfg["lang"]["flores"] == "ind_Latn"
    assert cfg["factor"] == 5


def test_dry_run_sweep_writes_eight_job_dirs_without_loading(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "model=gemma3_270m,smollm2_135m", "lang=id,fr", "factor=2,pmax", "dry_run=true",
                     f"hydra.sweep.dir={sweep}", timeout=60)
    assert result.returncode == 0, result.stderr
    summaries = set()
    for num in range(8):
        job = sweep / str(num)
        assert (job / "config.yaml").exists()
        assert not (job / "results.json").exists()
        summaries.add((job / "dry_run.txt").read_text().strip())
    assert len(summaries) == 8
    assert "model=smollm2_135m lang=fr factor=pmax stage=run" in summaries


@pytest.mark.parametrize("override, expected", [  # Hydra's own errors, and one of ours (every other message of
    ("model=nosuch", "Available options in 'model'"),  # ours is checked in-process: tests/test_settings_table.py)
    ("lang=xx", "Available options in 'lang'"),
    ("factor=abc", "factor='abc' is not allowed"),
])
def test_user_errors_exit_nonzero_without_traceback(override, expected, tmp_path):
    result = run_cli(override, "model=tiny", "logger=none", f"hydra.run.dir={tmp_path}", timeout=60) \
        if not override.startswith("model=") else run_cli(override, "logger=none", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    if not expected.startswith("Available"):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


BAD_OVERRIDES = [  # each must fail before any model loads, dry run or not, in one line; one invalid value of every
    # setting is checked in-process (tests/test_settings_table.py), these go through the CLI, loads and all
    ("factor=nan", "factor='nan' is not allowed: use a finite number"),
    ("patch.layers=99", "patch.layers has layer 99 out of range: this model has 4 layers"),
    ("stage=downstream eval.tasks=[xcopa,foo]", "eval.tasks has ['foo']: neither one of xcopa"),  # lm-eval's index
]


@pytest.mark.parametrize("override, expected, dry_run", [(*bad, dry_run) for bad in BAD_OVERRIDES
                                                         for dry_run in (False, True)][:-1])  # lm-eval's index once
def test_bad_settings_fail_in_one_line_before_any_model_loads(override, expected, dry_run, tmp_path):
    cache = tmp_path / "cache"  # empty: loading the tiny model would write its tokenizer's conversion here
    cache.mkdir()
    result = run_cli(*override.split(), "model=tiny", "logger=none", f"cache_dir={cache}", f"dry_run={dry_run}",
                     f"hydra.run.dir={tmp_path / 'run'}", timeout=60)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not any(cache.iterdir()), "the model was loaded before the settings were checked"
    assert not (tmp_path / "run" / "dry_run.txt").exists()


@pytest.mark.parametrize("best, expected", [
    ("factor=best", "factor=best: no factor search matches this model, neuron set"),
    ("method=best", "method=best: no compare run matches this model, neuron set"),
])
@pytest.mark.slow  # two CLI jobs that load the tiny model (about 25 s): in `make test-slow`
def test_best_without_a_matching_search_stops_before_anything_is_recorded(best, expected, tmp_path):
    """The search is looked up by the neuron set's key, computed before identification records anything."""
    cache = fresh_cache(tmp_path)
    result = run_cli("model=tiny", best, "stage=lss", "lang=fr", "identify.languages=[en,fr]",
                     "identify.max_tokens=300", "patch.neuron_set=baseline", "lss.n_facts=2", "lss.sources=[en]",
                     "logger=none", f"cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}", timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line, = result.stderr.strip().splitlines()[-1:]
    assert expected in line
    if best == "factor=best":
        assert ("run `python -m lsn_exp stage=factor_search model=tiny identify.languages=[en,fr] "
                "identify.max_tokens=300 patch.neuron_set=baseline lss.n_facts=2 lss.sources=[en] logger=none") in line
    assert not list((cache / "artifacts").rglob("meta.json")), "identification recorded before the lookup failed"


def composed(*overrides):
    """The job config the CLI would compose for ``overrides``, in-process (no subprocess)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_threads_and_other_machine_settings_stay_out_of_the_resume_hash():
    from lsn_exp.job import config_hash

    base = config_hash(composed("threads=1"))
    assert config_hash(composed("threads=2")) == base == config_hash(composed("threads=null"))
    assert config_hash(composed("threads=2", "cache_dir=/elsewhere", "logger=none", "force=true")) == base
    assert config_hash(composed("threads=2", "factor=5")) != base


def test_default_identification_is_all_of_dev_and_quick_caps_it():
    default = composed()
    assert default.identify.max_tokens is None and default.identify.split == "dev"
    assert composed("+experiment=quick").identify.max_tokens == 20000
    for preset in ("paper_lss", "paper_downstream", "factor_search"):
        assert composed(f"+experiment={preset}").identify.max_tokens is None, preset


def test_hub_model_offline_is_a_clear_error_not_a_hang(tmp_path):
    result = run_cli("model=qwen_mini", "logger=none", f"hydra.run.dir={tmp_path}", timeout=120,
                     env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "cannot load hub model Qwen/Qwen2.5-0.5B-Instruct@main" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_job_runs_in_process_from_a_composed_config(tmp_path):
    """run_job takes what it would read from Hydra as a Launch: a dry run and a bad setting, no subprocess."""
    from lsn_exp.errors import UserError
    from lsn_exp.job import Launch, run_job

    assert run_job(composed("model=tiny", "lang=fr", "factor=3", "dry_run=true"), Launch(tmp_path)) is None
    assert (tmp_path / "dry_run.txt").read_text() == "model=tiny lang=fr factor=3 stage=run\n"
    with pytest.raises(UserError, match="patch.layers has layer 99 out of range"):
        run_job(composed("model=tiny", "patch.layers=99"), Launch(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
