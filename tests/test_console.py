"""Quiet by default: third-party noise stays off the console unless --verbose (dimba/console.py)."""
import subprocess
import sys

import torch

from tests.launch import ROOT, env

IMPORT = "from dimba.console import quiet; quiet(); import deepspeed; print('imported')"


def test_deepspeed_imports_quietly_and_verbose_shows_its_accelerator_guess():
    quiet = subprocess.run([sys.executable, "-c", IMPORT], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stdout == "imported\n" and "accelerator" not in quiet.stderr, quiet
    if not torch.cuda.is_available():     # with CUDA, DeepSpeed finds it and has nothing to warn about
        loud = subprocess.run([sys.executable, "-c", IMPORT], cwd=ROOT, env={**env(), "DIMBA_VERBOSE": "1"},
                              capture_output=True, text=True)
        assert "Setting accelerator to CPU" in loud.stdout + loud.stderr, loud


def test_verbose_reaches_the_launcher_and_the_ranks(monkeypatch):
    from dimba import console
    monkeypatch.setenv(console.VERBOSE_ENV, "0")     # restored after the test, whatever quiet() sets
    assert console.launcher_flags() == ["--log_level", "critical"]
    console.quiet(verbose=True)          # sets DIMBA_VERBOSE=1, which the launched ranks inherit
    assert console.is_verbose() and console.launcher_flags() == []
    with console.hush_stdout():
        print("shown when verbose")
