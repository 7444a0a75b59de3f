"""The training loop and its parts, and what a run leaves on disk.

`train` builds a run and holds the loop (`fit`, one screen); `stepper` is one optimizer
step; `masks` the dropout masks of the rank's columns of the global batch; `schedule`
the learning rate; `meter` the log interval's statistics; `regularize`
(AR/TAR), `ntasgd` (averaged SGD) and `sampling` (the sampled softmax's candidates) are
the AWD and large-vocabulary recipes' parts; `evaluate` the loss over a split;
`checkpoint` the one explicit set of saved parts and the checkpoint files; `rundir` the
run directory (rank 0 writes, one job at a time); `observe` the console, TensorBoard and
metrics.jsonl. It may import `data`, `runtime` and the top-level `config`, `presets`,
`model`, `errors` and `hashing`; never `tools` or `cli`.
"""
