"""Training on Ray Train fed by Ray Data: the library that `jobs.train` composes.

config (the typed run config and its flags) -> init (starting weights) and epochs (the plan of
epochs, each epoch's split and the next one started in time, over datasets / shuffle /
sampling) -> engine (the per-worker loop) with distributed (its small collectives), records
(metrics, loggers, config.yaml), validation (COCO AP after each epoch) and test_hooks (fault
injection for the tests).
"""
