"""From text files to this rank's columns of token ids.

`datasets` finds a dataset's split files (an explicit directory, a local mirror, or
GluonNLP's dataset cache, fetched and sha1-checked); `text` reads a corpus into tokens,
builds the vocabulary and lays the ids out in BPTT columns; `cache` keeps each split's
ids and the vocabulary on disk, built once and memory-mapped; `corpus` gives this rank
its columns of every split and checks that all ranks read the same data; `bptt` cuts an
epoch into windows (fixed or variable length). It may import `runtime` (to agree across
ranks) and the top-level `config`, `errors` and `hashing`; never `training` or `tools`.
"""
