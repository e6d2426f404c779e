"""Quiet by default: third-party noise stays off the console unless --verbose (dimba/console.py)."""
import subprocess
import sys

import pytest

from tests.launch import ROOT, env

IMPORT = "from dimba.console import quiet; quiet(); import deepspeed; print('imported')"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the accelerator guess is a CPU machine's")
def test_deepspeed_imports_quietly_and_verbose_shows_its_warning():
    quiet = subprocess.run([sys.executable, "-c", IMPORT], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stdout == "imported\n" and "accelerator" not in quiet.stderr, quiet
    loud = subprocess.run([sys.executable, "-c", IMPORT], cwd=ROOT, env={**env(), "DIMBA_VERBOSE": "1"},
                          capture_output=True, text=True)
    assert "Setting accelerator to CPU" in loud.stdout + loud.stderr, loud


def test_verbose_reaches_the_launcher_and_the_ranks(monkeypatch):
    from dimba import console
    monkeypatch.setenv(console.VERBOSE_ENV, "0")     # restored after the test, whatever quiet() sets
    assert console.launcher_flags() == ["--log_level", "error"]
    console.quiet(verbose=True)          # sets DIMBA_VERBOSE=1, which the launched ranks inherit
    assert console.is_verbose() and console.launcher_flags() == []
    with console.hush_stdout():
        print("shown when verbose")
