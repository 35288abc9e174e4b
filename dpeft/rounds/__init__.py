"""The round core every mode drives: seeded sampling, the task ledger, the round tally and
strategy step, update validation, the round recorder (run directory, metrics, checkpoints,
resume, PEFT export) and the global model. Transport- and launcher-free: no grpc, no ray."""
