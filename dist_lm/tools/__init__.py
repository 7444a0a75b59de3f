"""Instruments and outputs around training: what measures it and what reads its results.

`bench` (`dist-lm bench`: throughput against the reference notebook's loop, whose step
is `reference`), `stepprofile` (`dist-lm bench-profile`: where a step's time goes, by
operator class), `ceiling` (`dist-lm bench-ceiling`: the decoder's GEMM rate on this
machine, and the job's share of it), `scale` (`dist-lm bench-scale`: start-up and
memory at WikiText-103 size), `netbench` (`dist-lm bench-net`: the allreduce across
simulated nodes), `chaos` and `chaos_checks` (`dist-lm chaos`: an elastic job on
simulated nodes under random faults, and what it came through with), `simnodes`
(launch/sim-cluster from Python, for those two), `report`
(`dist-lm report`: curves and a summary from metrics.jsonl) and `generate`
(`dist-lm generate`: sampled text). It may import `training`, `data`, `runtime` and the
top-level modules; nothing imports it but `cli`.
"""
