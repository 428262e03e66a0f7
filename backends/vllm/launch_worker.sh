#!/usr/bin/env bash
# Start one production vLLM worker on NVIDIA GPUs, shaped for the gateway. See backends/vllm/README.md.
#
#   MODEL=meta-llama/Llama-3.1-8B-Instruct SERVED_MODEL_NAME=llama-3.1-8b PORT=8000 \
#     backends/vllm/launch_worker.sh [extra vLLM arguments]
#
# Environment:
#   MODEL                   required: Hugging Face id or a local directory
#   SERVED_MODEL_NAME       the gateway's PUBLIC model name (default: MODEL). With the same name on both sides
#                           the deployment needs no `served_model`, and the gateway relays every chunk untouched.
#   HOST, PORT              default 0.0.0.0 and 8000 (the gateway's deployment: base_url http://HOST:PORT/v1)
#   TENSOR_PARALLEL_SIZE    GPUs per worker (default 1)
#   GPU_MEMORY_UTILIZATION  default 0.90
#   MAX_NUM_SEQS            sequences generating at once (default 256); more queue (vllm:num_requests_waiting)
#   MAX_MODEL_LEN           optional context-length cap
#   API_KEY                 optional: vLLM then demands `Authorization: Bearer API_KEY` (set the deployment's
#                           `api_key_env` to a variable holding it)
#   LAUNCHER                `docker` (the official vllm/vllm-openai image; default when docker is installed)
#                           or `native` (`vllm serve` from a `pip install vllm` environment)
#   VLLM_IMAGE              default vllm/vllm-openai:v0.32.0 (pin the tag the fleet was tested with)
#   HF_HOME                 model cache mounted into the container (default ~/.cache/huggingface)
set -euo pipefail

: "${MODEL:?set MODEL to a Hugging Face model id or a local model directory}"
SERVED_MODEL_NAME=${SERVED_MODEL_NAME:-$MODEL}
HOST=${HOST:-0.0.0.0}
PORT=${PORT:-8000}
TENSOR_PARALLEL_SIZE=${TENSOR_PARALLEL_SIZE:-1}
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.90}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-256}
VLLM_IMAGE=${VLLM_IMAGE:-vllm/vllm-openai:v0.32.0}
HF_HOME=${HF_HOME:-$HOME/.cache/huggingface}
if [ -z "${LAUNCHER:-}" ]; then
  if command -v docker >/dev/null 2>&1; then LAUNCHER=docker; else LAUNCHER=native; fi
fi

args=(
  --served-model-name "$SERVED_MODEL_NAME"
  --tensor-parallel-size "$TENSOR_PARALLEL_SIZE"
  --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION"
  --max-num-seqs "$MAX_NUM_SEQS"
  # The gateway logs requests itself; per-request logging in vLLM only costs throughput.
  --disable-uvicorn-access-log
)
[ -n "${MAX_MODEL_LEN:-}" ] && args+=(--max-model-len "$MAX_MODEL_LEN")
[ -n "${API_KEY:-}" ] && args+=(--api-key "$API_KEY")
args+=("$@")

case "$LAUNCHER" in
  docker)
    model_arg=$MODEL
    mounts=(-v "$HF_HOME:/root/.cache/huggingface")
    if [ -d "$MODEL" ]; then # a local directory: mount it read-only at the same path
      model_arg=$(cd "$MODEL" && pwd)
      mounts+=(-v "$model_arg:$model_arg:ro")
    fi
    exec docker run --rm --gpus all --ipc=host \
      -p "$HOST:$PORT:8000" "${mounts[@]}" \
      ${HF_TOKEN:+-e HF_TOKEN} \
      "$VLLM_IMAGE" \
      --model "$model_arg" --host 0.0.0.0 --port 8000 "${args[@]}"
    ;;
  native)
    exec vllm serve "$MODEL" --host "$HOST" --port "$PORT" "${args[@]}"
    ;;
  *)
    echo "launch_worker.sh: LAUNCHER must be docker or native, not $LAUNCHER" >&2
    exit 2
    ;;
esac
