"""The one error type of offline evaluation: an input a person has to fix; the message says which and how."""


class EvalError(ValueError):
    """Wrong data path, a tokenizer that does not match the model, a judge that cannot judge, ..."""
