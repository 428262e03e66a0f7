"""Real vLLM workers: CPU workers for development and the `vllm` test tier, GPU launch files (see README.md)."""
