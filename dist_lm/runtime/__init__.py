"""The distributed and process side: how ranks come to exist, talk, stop and end.

`dist` is the only module that imports Horovod (the `World` a rank sees, the gradient
allreduce-then-clip step, broadcasts); `lifecycle` turns signals into an agreed stop and
runs the watchdog; `launcher_env` reads what the launcher tells a rank and makes the
process-wide settings before MXNet loads (every rank takes rank 0's numerics variables);
`launch` is `dist-lm launch`, the supervisor that ends a launched job whole, and
`elastic` its elastic mode, which restarts the job's world on the hosts that `discovery`
finds (a discovery script, less the hosts cooling down after a failure);
`selfreport` is what each rank tells it about itself (host, pid, progress, how it
ended, whether a stop signal reached it) and `jobreport` how it decides, from that, a
probe of the hosts and last the launcher's words, what ended the job and which hosts
were lost; `procs` ends a launcher's whole session. Nothing here knows about language
models, data or checkpoints: it may import only the top-level `errors` and `config`;
never `data`, `training` or `tools`.
"""
