#!/usr/bin/env bash
# `make` calls this before anything that needs .venv: tutorial/maintenance/venv.sh PYTHON EXPLICIT TIER
#   PYTHON    the interpreter to build .venv with (the Makefile's PYTHON, default python3)
#   EXPLICIT  1 when the learner named it (make run PYTHON=python3.12): .venv must then be its
#   TIER      run: the service and what running a chapter needs (requirements-run.lock)
#             dev: everything the tests, docs, bench and linters need (requirements-dev.lock)
# It refuses an unsupported Python in one line, rebuilds a .venv that a failed install or another
# Python left behind, and installs a lock with --require-hashes only when the lock has changed.
set -euo pipefail
cd "$(dirname "$0")/../.."

python=$1 explicit=$2 tier=$3
venv=.venv
case $tier in
  run) lock=requirements-run.lock; need=(3 11) ;;
  # pymdown-extensions (the docs) needs 3.11.5; the service and `make run` need only 3.11.
  dev) lock=requirements-dev.lock; need=(3 11 5) ;;
  *) echo "tutorial/maintenance/venv.sh: unknown tier '$tier' (run or dev)" >&2; exit 2 ;;
esac
need_text=$(IFS=.; echo "${need[*]}")
supported="Python $need_text or newer is needed (3.11 to 3.13 are tested)"

say() { echo "==> $*"; }
version_of() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null; }
new_enough() { "$1" -c "import sys; sys.exit(sys.version_info < ($(IFS=,; echo "${need[*]}"),))"; }

# A .venv is reused only when it finished installing and runs the Python that was asked for.
if [ -e "$venv" ]; then
  why=
  have=$(version_of "$venv/bin/python" || true)
  if [ ! -e "$venv/.complete" ]; then
    why="an install into it did not finish"
  elif [ -z "$have" ]; then
    why="its Python no longer runs"
  elif [ "$explicit" = 1 ] && [ "$have" != "$(version_of "$python" || echo none)" ]; then
    why="it was made with Python $have, not $python"
  elif ! new_enough "$venv/bin/python"; then
    why="it was made with Python $have; $supported"
  fi
  if [ -n "$why" ]; then
    say "rebuilding $venv: $why"
    rm -rf "$venv"
  fi
fi

if [ ! -e "$venv" ]; then
  found=$(version_of "$python" || true)
  if [ -z "$found" ]; then
    echo "$supported; '$python' was not found. Try: make run PYTHON=python3.12" >&2
    exit 1
  fi
  if ! new_enough "$python"; then
    echo "$supported; $python is Python $found. Try: make run PYTHON=python3.12" >&2
    exit 1
  fi
  say "creating $venv with Python $found"
  "$python" -m venv "$venv"
  touch "$venv/.complete"
fi

# The dev lock holds every pin of the run lock at the same version (make pins makes them so).
sum() { cksum < "$1"; }
stamp() { echo "$venv/.installed-$1"; }
current() { [ -e "$(stamp "$1")" ] && [ "$(cat "$(stamp "$1")")" = "$(sum "requirements-$1.lock")" ]; }
if current "$tier" || { [ "$tier" = run ] && current dev; }; then
  exit 0
fi

count=$(grep -c '^[a-zA-Z0-9]' "$lock" || true)
say "installing $lock into $venv ($count packages, pinned, with hashes)"
rm -f "$venv/.complete"
started=$(date +%s)
# uv installs a lock in a sixth of pip's time (the dev lock: 9 s against 60, from an empty
# cache). pip installs uv itself first, checked against the dev lock's hashes for it.
# Both logs go to install.log; the lines shown say what is happening, so it never looks stuck.
log=$venv/install.log
failed() {
  echo "$1 failed; the last lines of $log (the next make rebuilds $venv):" >&2
  tail -n 15 "$log" >&2
  exit 1
}
if [ "$count" -gt 0 ]; then
  if [ ! -x "$venv/bin/uv" ]; then
    awk '/^uv==/ {on = 1} on {print; if ($0 !~ /\\$/) exit}' requirements-dev.lock \
      > "$venv/uv.txt"
    echo "    uv, the installer ($(head -n 1 "$venv/uv.txt" | cut -d' ' -f1))"
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-compile \
      --require-hashes -r "$venv/uv.txt" > "$log" 2>&1 || failed pip
  fi
  # --no-config: a uv.toml of the learner's own must not change what is installed.
  "$venv/bin/uv" pip install --no-config --python "$venv/bin/python" --require-hashes \
    -r "$lock" 2>&1 | tee -a "$log" \
    | { grep --line-buffered -E '^(Resolved|Prepared|Installed|Uninstalled) ' \
      | sed 's/^/    /' || true; } || failed uv
fi
sum "$lock" > "$(stamp "$tier")"
touch "$venv/.complete"
say "$venv is ready: $count pinned packages from $lock, installed in $(( $(date +%s) - started )) s"
