"""The named model sizes `--model` accepts, as ModelConfig fields, and the training
recipes that come with their families. No MXNet here, so that the configuration can name
and check models without loading the model code."""

# The GluonNLP model zoo's LSTM language models (gluonnlp/model/language_model.py).
PRESETS = {
    "standard_lstm_lm_200": dict(family="standard", embed_size=200, hidden_size=200,
                                 num_layers=2, tie_weights=True, dropout=0.2),
    "standard_lstm_lm_650": dict(family="standard", embed_size=650, hidden_size=650,
                                 num_layers=2, tie_weights=True, dropout=0.5),
    "standard_lstm_lm_1500": dict(family="standard", embed_size=1500, hidden_size=1500,
                                  num_layers=2, tie_weights=True, dropout=0.65),
    "awd_lstm_lm_600": dict(family="awd", embed_size=200, hidden_size=600, num_layers=3,
                            tie_weights=True, dropout=0.2, weight_drop=0.2, drop_h=0.1,
                            drop_i=0.3, drop_e=0.05),
    "awd_lstm_lm_1150": dict(family="awd", embed_size=400, hidden_size=1150, num_layers=3,
                             tie_weights=True, dropout=0.4, weight_drop=0.5, drop_h=0.2,
                             drop_i=0.65, drop_e=0.1),
}

# The training recipe behind each family's published perplexities, as Config fields by
# section: applied under the model preset when `--recipe auto` (the default) meets a model
# of that family, or when named with `--recipe`. The standard recipe is the field defaults
# (the reference notebook's). The AWD recipe is the defaults of GluonNLP 0.10's
# scripts/language_model/word_language_model.py: lr 30, 80 columns (global, whatever the
# rank count) of variable-length BPTT around 70, weight decay 1.2e-6, AR alpha 2 and TAR
# beta 1, the lr x0.1 after 30 validations without improvement, Adam (if chosen) with
# beta1 0 and epsilon 1e-9, and its evaluation layouts: validation on 10 columns, test
# on 1. The dropouts come with the model preset (the zoo's). See docs/awd.md.
RECIPES = {
    "standard": {},
    "awd": {
        "optim": dict(lr=30.0, wd=1.2e-6, alpha=2.0, beta=1.0, lr_update_interval=30,
                      lr_update_factor=0.1, adam_beta1=0.0, adam_epsilon=1e-9),
        "run": dict(global_batch_size=80, bptt=70, variable_bptt=True, eval_batch_size=10,
                    test_batch_size=1),
    },
}
