"""Authentication stage: key format and hashing (`keys`), the in-process key table and the check (`store`)."""
