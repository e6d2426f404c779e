"""Shared test set-up: the real local Slurm fixture, and the repository root on sys.path."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest_plugins = ["tests.slurm_fixture"]

import subprocess  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def bundled_shards(tmp_path_factory) -> Path:
    """The bundled corpus, sharded with data_prep/shard.py exactly as the README does (about 2 s)."""
    out = tmp_path_factory.mktemp("bundled") / "shards"
    subprocess.run([sys.executable, str(ROOT / "data_prep" / "shard.py"), "--input", str(ROOT / "data_prep" / "corpus" / "*.txt"),
                    "--tokenizer", str(ROOT / "data_prep" / "tokenizer" / "tokenizer.model"), "--output", str(out),
                    "--val-fraction", "0.05", "--shard-tokens", "100000", "--no-progress"],
                   check=True, capture_output=True, cwd=ROOT)
    return out
