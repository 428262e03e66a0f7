"""Metering stage: prices (`prices`), cost arithmetic (`cost`), usage records (`records`) and the ledger
writer (`writer`). Invariant: every admitted request produces exactly one usage record, success or error."""
