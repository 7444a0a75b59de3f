"""The distributed and process side: how ranks come to exist, talk, stop and end.

`dist` is the only module that imports Horovod (the `World` a rank sees, the gradient
allreduce-then-clip step, broadcasts); `lifecycle` turns signals into an agreed stop and
runs the watchdog; `launcher_env` reads what the launcher tells a rank and makes the
process-wide settings before MXNet loads (every rank takes rank 0's numerics variables);
`launch` is `dist-lm launch`, the supervisor that ends a launched job whole;
`selfreport` is what each rank tells it about itself (host, pid, how it ended) and
`jobreport` how it decides, from that, a probe of the hosts and last the launcher's
words, what ended the job; `procs` ends a launcher's whole session. Nothing here
knows about language models, data or checkpoints: it may import only the top-level
`errors`; never `data`, `training` or `tools`.
"""
