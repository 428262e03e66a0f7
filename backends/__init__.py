"""Model-serving backends the gateway talks to: a fast mock and launch files for real vLLM workers."""
