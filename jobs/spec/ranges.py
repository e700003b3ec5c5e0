"""The guide's ranges: values a spec may hold but that get a warning (TrainingRunSpec.advice), for every
method and for the preference methods."""
from __future__ import annotations

#: The guide's ranges (docs/data-rules.md): advice, not limits. (field, low, high, why it matters)
GUIDE_RANGES = [
    ("lora.rank", 16, 64, "lower ranks may underfit a new domain or tone, higher ones cost memory and "
                          "overfit small data"),
    ("lora.alpha", 16, 64, "alpha/rank scales the adapter's update: far outside the range it is too weak or "
                           "unstable"),
    ("training.learning_rate", 1e-4, 2e-4, "above it LoRA training often diverges or copies the data; below it, "
                                           "it learns slowly"),
    ("training.epochs", 1, 3, "more passes over small data mostly teach verbatim copying (watch validation loss)"),
    ("training.weight_decay", 0.0, 0.1, "the guide uses 0.01"),
    ("lora.dropout", 0.0, 0.2, "the guide uses 0.05; much more slows learning"),
    ("eval.temperature", 0.2, 0.4, "the guide evaluates at 0.2-0.4, where answers are stable enough to compare"),
]


#: Advice for the preference methods, in GUIDE_RANGES' shape; a method's learning-rate range replaces the SFT one.
PREFERENCE_RANGES: dict[str, list[tuple[str, float, float, str]]] = {
    "dpo": [
        ("training.beta", 0.01, 0.5, "DPO's beta (Rafailov et al. 2023, 'Direct Preference Optimization'; TRL's "
                                     "default 0.1): much lower lets the adapter drift far from the reference and "
                                     "over-optimise the pairs, much higher barely moves it"),
        ("training.learning_rate", 5e-6, 5e-5, "DPO moves a model with far smaller steps than SFT: TRL's DPOConfig "
                                               "defaults to 1e-6 for full weights, and LoRA adapters commonly train at "
                                               "5e-6 to 5e-5 (the SFT default, 2e-4, is above it)"),
    ],
    "orpo": [
        ("training.beta", 0.05, 1.0, "ORPO's lambda (Hong et al. 2024, 'ORPO: Monolithic Preference Optimization "
                                     "without Reference Model', uses 0.1 and studies up to 1.0; TRL's "
                                     "default 0.1), the weight of the odds-ratio term against the chosen side's "
                                     "loss: much lower is plain SFT on the chosen answers"),
        ("training.learning_rate", 5e-6, 5e-5, "like DPO: TRL's ORPOConfig defaults to 1e-6 for full weights, "
                                               "and LoRA adapters commonly train at 5e-6 to 5e-5"),
    ],
}
