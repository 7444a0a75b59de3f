"""dist-lm: data-parallel LSTM language-model training with Horovod and MXNet Gluon."""

__version__ = "0.1.0"
