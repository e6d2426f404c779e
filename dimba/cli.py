"""What the command lines share: a parser whose errors are one line, and value types checked at parse time.

    p = ArgumentParser(prog="tools/sample.py", description=__doc__)
    p.add_argument("--length", type=positive_int)  # error: argument --length: must be a positive integer, got -5 (...)
    p.add_argument("--device", type=device)        # cpu, cuda, cuda:N; cuda only where torch sees a GPU
"""
from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a bad command line answered in one line (no usage block), exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    return _int(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _int(text, 0, "an integer >= 0")


def _int(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def device(text: str) -> str:
    """A torch device this machine has: cpu, or cuda[:N] with N below the number of GPUs torch sees."""
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU that torch can use; use cpu")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return text
