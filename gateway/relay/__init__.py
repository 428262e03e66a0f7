"""Relay stage: forwarding a request upstream and its answer back, JSON (`forward`) or SSE (`stream`)."""
