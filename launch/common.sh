# Shared by the launch scripts: argument helpers and a dry-run aware runner.
# shellcheck shell=bash

DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python}

# run ENV=VAL... -- CMD ARGS...: prints the command (shell-quoted, copy-pasteable) under --dry-run, else runs it.
run() {
  local envs=()
  while [[ $# -gt 0 && $1 != "--" ]]; do envs+=("$1"); shift; done
  shift
  if [[ $DRY_RUN == 1 ]]; then
    local line=""
    for e in "${envs[@]}"; do line+="$(printf '%q ' "$e")"; done
    line+="$(printf '%q ' "$@")"
    echo "${line% }"
  else
    env "${envs[@]}" "$@"
  fi
}

die() { echo "$(basename "$0"): $*" >&2; exit 2; }
