"""Every setting checked before anything loads: one invalid value per leaf key of every config, table-driven.

Each row composes the config in-process (as Hydra does for the CLI) and runs the check the CLI runs first
(``preflight.validate(cfg, job.STAGES)``, before any model load and before a dry run writes anything): it must
end in a one-line UserError. A few rows also run through ``python -m lsn_exp ... dry_run=true`` to show that the
CLI prints exactly that line (exit 2, no traceback). The leaf keys of the default config and of every preset
are walked, so a new key fails ``test_every_leaf_key_has_an_invalid_value`` until it gets a row here.
"""

from __future__ import annotations

import copy
import time
from functools import lru_cache

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from conftest import run_cli
from lsn_exp import CONF_DIR, preflight
from lsn_exp.errors import UserError
from lsn_exp.job import STAGES

BASE = ("model=tiny",)  # 4 layers, known without any download: layer ranges are checked the same everywhere

# (leaf key, overrides on top of BASE, what the one-line message says). Wrong type, out of range, unknown name,
# empty list, missing file: each must fail before anything loads.
TABLE = [
    # the job
    ("stage", ["stage=nosuch"], "stage=nosuch is not one of"),
    ("stage", ["stage=[run]"], "stage=['run'] is not one of"),
    ("factor", ["factor=nan"], "factor='nan' is not allowed: use a finite number"),
    ("factor", ["factor=inf"], "factor='inf' is not allowed: use a finite number"),
    ("factor", ["factor=-inf"], "factor='-inf' is not allowed: use a finite number"),
    ("factor", ["factor=abc"], "factor='abc' is not allowed"),
    ("dry_run", ["dry_run=maybe"], "dry_run=maybe is not allowed: use true or false"),
    ("force", ["force=2"], "force=2 is not allowed: use true or false"),
    ("seed", ["seed=abc"], "seed='abc' is not allowed: use a whole number >= 0"),
    ("seed", ["seed=-1"], "seed=-1 is not allowed"),
    ("threads", ["threads=0"], "threads=0 is not allowed"),
    ("threads", ["threads=abc"], "threads='abc' is not allowed"),
    ("scoring_processes", ["scoring_processes=0"], "scoring_processes=0 is not allowed"),
    ("cache_dir", ["cache_dir=/dev/null/cache"], "cache_dir=/dev/null/cache is not writable"),
    ("data.root", ["data.root=/nonexistent/data"], "does not exist: set data.root=DIR"),
    ("method_name", ["method_name=a b"], "method_name='a b' is not allowed"),
    ("layer", ["+experiment=per_layer", "layer=abc"], "patch.layers='abc' is not a layer selection"),
    # model (the tiny model's own keys; hub and GGUF keys on those presets)
    ("model.name", ["model.name=a/b"], "model.name=a/b is not allowed"),
    ("model.source", ["model.source=ftp"], "model.source=ftp is not allowed: use one of hub, local"),
    ("model.id", ["model=gemma", "model.id=null"], "model.id=None is not allowed: use a hub id"),
    ("model.revision", ["model.revision=''"], "model.revision='' is not allowed"),
    ("model.dtype", ["model.dtype=float8"], "model.dtype=float8 is not allowed: use one of auto, float32"),
    ("model.device", ["model.device=gpu"], "model.device=gpu is not allowed: use auto, cpu, cuda"),
    ("model.batch_size", ["model.batch_size=0"], "model.batch_size=0 is not allowed"),
    ("model.reference", ["model=gemma3_270m", "model.reference=''"], "model.reference='' is not allowed"),
    ("model.package", ["model=gemma3_270m", "model.package=no_such_package_xyz"],
     "model.package=no_such_package_xyz is not installed"),
    ("model.gguf_file", ["model=gemma3_270m", "model.gguf_file=model.bin"], "model.gguf_file=model.bin is not allowed"),
    ("model.seed", ["model.seed=-1"], "model.seed=-1 is not allowed"),
    ("model.tokenizer_model", ["model.tokenizer_model=nosuch"], "model.tokenizer_model='nosuch' is not allowed"),
    ("model.bos", ["model.bos=maybe"], "model.bos=maybe is not allowed: use true or false"),
    ("model.arch.model_type", ["model.arch.model_type=gpt2"], "model.arch.model_type=gpt2 is not allowed"),
    ("model.arch.hidden_size", ["model.arch.hidden_size=0"], "model.arch.hidden_size=0 is not allowed"),
    ("model.arch.intermediate_size", ["model.arch.intermediate_size=abc"],
     "model.arch.intermediate_size='abc' is not allowed"),
    ("model.arch.num_hidden_layers", ["model.arch.num_hidden_layers=-4"],
     "model.arch.num_hidden_layers=-4 is not allowed"),
    ("model.arch.num_attention_heads", ["model.arch.num_attention_heads=0"],
     "model.arch.num_attention_heads=0 is not allowed"),
    ("model.arch.num_key_value_heads", ["model.arch.num_key_value_heads=1.5"],
     "model.arch.num_key_value_heads=1.5 is not allowed"),
    ("model.arch.head_dim", ["model.arch.head_dim=0"], "model.arch.head_dim=0 is not allowed"),
    ("model.arch.max_position_embeddings", ["model.arch.max_position_embeddings=0"],
     "model.arch.max_position_embeddings=0 is not allowed"),
    # logger
    ("logger.name", ["logger.name=tensorboard"], "logger.name=tensorboard is not allowed: use one of none, wandb"),
    ("logger.project", ["logger.project=''"], "logger.project='' is not allowed"),
    ("logger.entity", ["logger.entity=''"], "logger.entity='' is not allowed"),
    ("logger.mode", ["logger.mode=sometimes"], "logger.mode=sometimes is not allowed: use one of online"),
    ("logger.tags", ["logger.tags=5"], "logger.tags=5 is not allowed: use a list of words"),
    ("logger.init_timeout", ["logger.init_timeout=0"], "logger.init_timeout=0 is not allowed"),
    # lang: chosen with lang=CODE, its fields come from conf/lang
    ("lang.code", ["lang.code=xx"], "lang.code='xx' is not allowed: choose the language with lang=CODE"),
    ("lang.index", ["lang.index=5"], "lang.index=5 does not match conf/lang/id.yaml"),
    ("lang.name", ["lang.name=Klingon"], "lang.name='Klingon' does not match conf/lang/id.yaml"),
    ("lang.flores", ["lang.flores=xxx_Latn"], "lang.flores='xxx_Latn' does not match"),
    ("lang.xcopa", ["lang.xcopa=null"], "lang.xcopa=None does not match"),
    ("lang.xwinograd", ["lang.xwinograd=id"], "lang.xwinograd='id' does not match"),
    ("lang.mlama", ["lang.mlama=xx"], "lang.mlama='xx' does not match"),
    ("lang.include", ["lang.include=klingon"], "lang.include='klingon' does not match"),
    # identify
    ("identify.languages", ["identify.languages=[en]"], "LAPE compares two or more languages"),
    ("identify.languages", ["identify.languages=[en,xx]"], "identify.languages=['en', 'xx'] is not allowed"),
    ("identify.split", ["identify.split=test"], "identify.split=test is not allowed"),
    ("identify.max_tokens", ["identify.max_tokens=0"], "identify.max_tokens=0 is not allowed"),
    ("identify.n_stat_sentences", ["identify.n_stat_sentences=0"], "identify.n_stat_sentences=0 is not allowed"),
    ("identify.prefix", ["identify.prefix=''"], "identify.prefix='' is not allowed"),
    ("identify.top_rate", ["identify.top_rate=0"], "identify.top_rate=0 is not allowed"),
    ("identify.filter_rate", ["identify.filter_rate=1.5"], "identify.filter_rate=1.5 is not allowed"),
    ("identify.bar_rate", ["identify.bar_rate=abc"], "identify.bar_rate='abc' is not allowed"),
    ("identify.batch_size", ["identify.batch_size=0"], "identify.batch_size=0 is not allowed"),
    ("identify.from", ["identify.from=/nonexistent/neurons"], "identify.from=/nonexistent/neurons: "),
    # patch
    ("patch.neuron_set", ["patch.neuron_set=foo"], "patch.neuron_set=foo is not allowed"),
    ("patch.op", ["patch.op=pow"], "patch.op=pow is not allowed"),
    ("patch.value", ["patch.op=set", "patch.value=nan"], "patch.value=nan is not a finite number"),
    ("patch.stat", ["patch.stat=foo"], "patch.stat=foo is not allowed"),
    ("patch.coef", ["patch.coef=abc"], "patch.coef='abc' is not a finite number"),
    ("patch.layers", ["patch.layers=99"], "patch.layers has layer 99 out of range: this model has 4 layers"),
    ("patch.layers", ["patch.layers=-1"], "patch.layers=-1 has a negative layer"),
    ("patch.layers", ["patch.layers=5-2"], "patch.layers='5-2' selects no layer"),
    ("patch.layers", ["patch.layers=abc"], "patch.layers='abc' is not a layer selection"),
    ("patch.layers", ["factor=best", "patch.layers=7"], "patch.layers has layer 7 out of range"),
    ("patch.others_op", ["patch.others_op=pow", "patch.others_value=0"], "patch.others_op=pow is not allowed"),
    ("patch.others_value", ["patch.others_op=set", "patch.others_value=abc"],
     "patch.others_value='abc' is not a finite number"),
    ("patch.others_langs", ["patch.others_langs=[xx]"], "patch.others_langs=['xx'] is not allowed"),
    # steer
    ("steer.alpha", ["steer.alpha=abc"], "steer.alpha='abc' is not a number"),
    ("steer.layers", ["steer.layers=abc"], "steer.layers='abc' is not a layer selection"),
    ("steer.layers", ["steer.layers=[]"], "steer.layers=[] selects no layer"),
    ("steer.layers", ["steer.layers=7"], "steer.layers has layer 7 out of range: this model has 4 layers"),
    ("steer.scale", ["steer.scale=cube"], "steer.scale=cube is not allowed"),
    # prompt
    ("prompt.mode", ["prompt.mode=shout"], "prompt.mode=shout is not allowed"),
    ("prompt.mode", ["stage=downstream", "prompt.mode=priming"], "prompt baselines are scored on LSS and generation"),
    ("prompt.sentence", ["prompt.sentence=-1"], "prompt.sentence=-1 is not allowed"),
    ("prompt.sentence", ["prompt.sentence=997"], "prompt.sentence=997 is not allowed: FLORES dev has 997"),
    # generate
    ("generate.sources", ["generate.sources=[]"], "generate.sources=[] is not allowed"),
    ("generate.sources", ["generate.sources=[xx]"], "generate.sources=['xx'] is not allowed"),
    ("generate.n_prompts", ["generate.n_prompts=0"], "generate.n_prompts=0 is not allowed"),
    ("generate.prompt_words", ["generate.prompt_words=0"], "generate.prompt_words=0 is not allowed"),
    ("generate.first_sentence", ["generate.first_sentence=-1"], "generate.first_sentence=-1 is not allowed"),
    ("generate.prompts_file", ["generate.prompts_file=/nonexistent.yaml"],
     "generate.prompts_file=/nonexistent.yaml is not a file"),
    ("generate.prompts", ["generate.prompts=[]"], "generate.prompts must be {lang: [prompt, ...]}"),
    ("generate.domain", ["generate.domain=sports"], "generate.domain=sports is not a prompt domain"),
    ("generate.max_new_tokens", ["generate.max_new_tokens=0"], "generate.max_new_tokens=0 is not allowed"),
    ("generate.repetition_n", ["generate.repetition_n=0"], "generate.repetition_n=0 is not allowed"),
    ("generate.max_repetition", ["generate.max_repetition=abc"], "generate.max_repetition='abc' is not allowed"),
    ("generate.max_repetition", ["generate.max_repetition=2"], "generate.max_repetition=2 is not allowed"),
    # the engine
    ("engine.name", ["engine.name=sglang"], "engine.name=sglang is not allowed: use one of hf, vllm"),
    ("engine.enforce_eager", ["engine=vllm", "engine.enforce_eager=maybe"], "engine.enforce_eager=maybe is not"),
    ("engine.enable_prefix_caching", ["engine=vllm", "engine.enable_prefix_caching=2"],
     "engine.enable_prefix_caching=2 is not"),
    ("engine.max_model_len", ["engine=vllm", "engine.max_model_len=0"], "engine.max_model_len=0 is not allowed"),
    ("engine.max_num_seqs", ["engine=vllm", "engine.max_num_seqs=-1"], "engine.max_num_seqs=-1 is not allowed"),
    ("engine.tensor_parallel_size", ["engine=vllm", "engine.tensor_parallel_size=0.5"],
     "engine.tensor_parallel_size=0.5 is not allowed"),
    ("engine.gpu_memory_utilization", ["engine=vllm", "engine.gpu_memory_utilization=1.5"],
     "engine.gpu_memory_utilization=1.5 is not allowed"),
    ("generate.lid", ["generate.lid=cld9"], "generate.lid=cld9 is not allowed: use one of py3langid, lingua"),
    ("generate.lid", ["generate.lid=fasttext"], "generate.lid=fasttext is not allowed: use one of py3langid"),
    # compare (checked whatever the stage: a sweep never carries a bad compare setting)
    ("compare.targets", ["compare.targets=[]"], "compare.targets=[] is not allowed"),
    ("compare.targets", ["compare.targets=[xx]"], "compare.targets=['xx'] is not allowed"),
    ("compare.lss_n_facts", ["compare.lss_n_facts=0"], "compare.lss_n_facts=0 is not allowed"),
    ("compare.n_prompts", ["compare.n_prompts=-1"], "compare.n_prompts=-1 is not allowed"),
    ("compare.n_prompts", ["stage=compare", "compare.n_prompts=-1"], "compare.n_prompts=-1 is not allowed"),
    ("compare.domains", ["compare.domains=[sports]"], "compare.domains=['sports'] is not allowed"),
    ("compare.xcopa_limit", ["compare.xcopa_limit=-1"], "compare.xcopa_limit=-1 is not allowed"),
    ("compare.methods", ["compare.methods=[]"], "compare.methods=[] is not allowed"),
    ("compare.methods", ["compare.methods=[{name: a, factor: abc}]"], "compare.methods 'a': factor='abc'"),
    ("compare.methods", ["compare.methods=[{name: a, patch: {opp: set}}]"], "compare.methods 'a': patch="),
    ("compare.methods", ["compare.methods=[{name: a, facotr: 2}]"], "compare.methods 'a' has unknown key(s)"),
    ("compare.methods", ["compare.methods=[{name: a},{name: a}]"], "compare.methods has duplicate names"),
    ("compare.search.objective", ["compare.search.objective=foo"], "compare.search.objective=foo is not allowed"),
    ("compare.search.n_evals", ["compare.search.n_evals=0"], "compare.search.n_evals=0 is not allowed"),
    ("compare.search.domain", ["compare.search.domain=sports"], "compare.search.domain=['sports'] is not allowed"),
    ("compare.search.n_prompts", ["compare.search.n_prompts=0"], "compare.search.n_prompts=0 is not allowed"),
    ("compare.search.n_facts", ["compare.search.n_facts=0"], "compare.search.n_facts=0 is not allowed"),
    ("compare.search.max_ppl_ratio", ["compare.search.max_ppl_ratio=0"],
     "compare.search.max_ppl_ratio=0 is not allowed"),
    ("compare.final.n_prompts", ["compare.final.n_prompts=0"], "compare.final.n_prompts=0 is not allowed"),
    # lss
    ("lss.n_facts", ["lss.n_facts=0"], "lss.n_facts=0 is not allowed"),
    ("lss.n_facts", ["lss.n_facts=-3"], "lss.n_facts=-3 is not allowed"),
    ("lss.targets", ["lss.targets=[xx]"], "lss.targets=['xx']: use all or a list of LSS languages"),
    ("lss.seed", ["lss.seed=abc"], "lss.seed='abc' is not allowed"),
    ("lss.sources", ["lss.sources=[xx]"], "lss.sources=['xx']: use all or a list of LSS languages"),
    ("lss.targets", ["lss.targets=[]"], "lss.targets=[]: use all or a list of LSS languages"),
    ("lss.tol", ["lss.tol=-1"], "lss.tol=-1.0 is not allowed"),
    ("lss.batch_size", ["lss.batch_size=0"], "lss.batch_size=0 is not allowed"),
    ("lss.bootstrap", ["lss.bootstrap=-1"], "lss.bootstrap=-1 is not allowed"),
    ("lss.weakest", ["lss.weakest=abc"], "lss.weakest='abc' is not allowed"),
    ("lss.search.n_facts", ["lss.search.n_facts=0"], "lss.search.n_facts=0 is not allowed"),
    ("lss.search.sources", ["lss.search.sources=[ht]"], "lss.search.sources=['ht']: use all or a list"),
    ("lss.search.targets", ["lss.search.targets=[]"], "lss.search.targets=[]: use all or a list"),
    ("lss.search.grid", ["lss.search.grid=[]"], "lss.search.grid is empty"),
    ("lss.search.grid", ["lss.search.grid=[{name: x, op: pow}]"], "patch.op=pow is not allowed"),
    # eval
    ("eval.tasks", ["eval.tasks=[]"], "eval.tasks=[] is not allowed"),
    ("eval.include_path", ["eval.include_path=/nonexistent/tasks"], "eval.include_path=/nonexistent/tasks is not"),
    ("eval.task_langs", ["+eval.task_langs.mytask=xx"], "eval.task_langs names unknown language(s) ['xx']"),
    ("eval.langs", ["eval.langs=[xx]"], "eval.langs has unknown language(s) ['xx']"),
    ("eval.limit", ["eval.limit=0"], "eval.limit=0 is not allowed"),
    ("eval.limits", ["+eval.limits.foo=3"], "eval.limits names unknown tasks ['foo']"),
    ("eval.batch_size", ["eval.batch_size=0"], "eval.batch_size=0 is not allowed"),
    ("eval.mt_prompt", ["eval.mt_prompt=shout"], "eval.mt_prompt=shout is not allowed"),
    ("eval.flores_split", ["eval.flores_split=test"], "eval.flores_split=test is not allowed"),
    ("eval.bootstrap", ["eval.bootstrap=-5"], "eval.bootstrap=-5 is not allowed"),
    ("eval.seed", ["eval.seed=abc"], "eval.seed='abc' is not allowed"),
]

# Leaf keys that accept any value, with the reason (none today: every key has an invalid value above).
ACCEPTS_ANYTHING: dict[str, str] = {}

# Every preset of every config group (and each experiment); their leaf keys together are the keys to cover. The
# language presets all hold the same keys (data.Language's fields: the registry is built from them), so one
# stands for all 18 (a composition takes a fifth of a second).
GROUP_NAMES = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
GROUPS = sorted(GROUP_NAMES - {"hydra", "experiment"})
PRESETS = [[]] + [[f"{group}={p.stem}"] for group in GROUPS for p in sorted((CONF_DIR / group).glob("*.yaml"))
                  if group != "lang" or p.stem == "fr"] \
    + [[f"+experiment={p.stem}"] for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))]


@lru_cache(maxsize=None)
def composed(overrides: tuple[str, ...]):
    """The config Hydra composes for ``overrides`` (cached: a composition takes a fifth of a second; not mutated)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def with_overrides(overrides) -> DictConfig:
    """``composed(overrides)``, quicker: the config group choices composed once, the values then applied by the
    code that applies them in Hydra's compose (same parser, same merge)."""
    is_group = [o.lstrip("+~").split("=")[0] in GROUP_NAMES for o in overrides]
    cfg = copy.deepcopy(composed(tuple(o for o, group in zip(overrides, is_group) if group)))
    values = [o for o, group in zip(overrides, is_group) if not group]
    ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(values), cfg)
    return cfg


def failure(overrides) -> str:
    """The one-line message the CLI's first check (preflight.validate) gives for ``overrides``."""
    cfg = with_overrides([*BASE, *overrides])
    with pytest.raises(UserError) as err:
        preflight.validate(cfg, STAGES)
    return str(err.value)


def leaf_keys(node, prefix: str = ""):
    """Dotted keys of every leaf: a scalar, a list (the whole list) or an empty mapping."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaf_keys(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip(".")


@pytest.mark.parametrize("key, overrides, expected", TABLE, ids=[" ".join(row[1]) for row in TABLE])
def test_an_invalid_value_fails_in_one_line_before_anything_loads(key, overrides, expected):
    message = failure(overrides)
    assert expected in message, message
    assert "\n" not in message


def test_every_leaf_key_has_an_invalid_value():
    """Walks the default config and every preset: a leaf key with neither a row nor a reason fails here."""
    keys = {}
    for overrides in PRESETS:
        for key in leaf_keys(OmegaConf.to_container(composed(tuple(overrides)), resolve=False)):
            keys.setdefault(key, overrides)
    covered = {row[0] for row in TABLE}
    missing = {k: v for k, v in sorted(keys.items()) if k not in covered and k not in ACCEPTS_ANYTHING}
    assert not missing, "leaf keys without an invalid value in TABLE (or a reason in ACCEPTS_ANYTHING): " + \
        ", ".join(f"{k} (from {' '.join(v) or 'the default config'})" for k, v in missing.items())
    stale = sorted((covered | set(ACCEPTS_ANYTHING)) - set(keys))
    assert not stale, f"TABLE / ACCEPTS_ANYTHING name keys no config has: {stale}"


WRONG_TYPES = ("5", "[xx]", "{a: 1}")  # a number, a list, a mapping: each key refuses some of them in one line


def test_no_value_of_a_wrong_type_escapes_as_a_traceback():
    """Every leaf key of the default config set to each of WRONG_TYPES: validation passes or says one line, it never
    fails with a TypeError, AttributeError or the like (which the CLI would print as a traceback)."""
    escaped = []
    for key in leaf_keys(OmegaConf.to_container(composed(BASE), resolve=False)):
        for value in WRONG_TYPES:
            try:
                cfg = with_overrides([*BASE, f"{key}={value}"])
            except ConfigCompositionException:  # Hydra refuses it itself (a mapping onto a list): its own message
                continue
            try:
                preflight.validate(cfg, STAGES)
            except UserError as err:
                if "\n" in str(err):
                    escaped.append(f"{key}={value}: a message of several lines")
            except Exception as err:  # noqa: BLE001 - what this test looks for
                escaped.append(f"{key}={value}: {type(err).__name__}: {err}")
    assert not escaped, "\n".join(escaped)


@pytest.mark.parametrize("overrides", PRESETS, ids=[" ".join(o) or "default" for o in PRESETS])
def test_every_preset_passes_the_checks(overrides):
    """The checks are not stricter than the shipped configs."""
    preflight.validate(composed(tuple(overrides)), STAGES)


def test_the_table_runs_in_seconds():
    start = time.perf_counter()
    for _, overrides, _ in TABLE[:20]:
        failure(overrides)
    assert time.perf_counter() - start < 10, "validation should stay light: no torch, no model, no lm-eval"


CLI_ROWS = ["seed=abc", "compare.n_prompts=-1", "model.dtype=float8"]


@pytest.mark.parametrize("override", CLI_ROWS)
def test_the_cli_prints_the_same_line_in_a_dry_run(override, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    result = run_cli(*BASE, override, "dry_run=true", f"cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}",
                     timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"lsn_exp: error: {failure([override])}"]
    assert not any(cache.iterdir()) and not (tmp_path / "run" / "dry_run.txt").exists()
