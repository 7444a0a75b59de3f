"""The named model sizes `--model` accepts, as ModelConfig fields. No MXNet here, so that
the configuration can name and check models without loading the model code."""

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
