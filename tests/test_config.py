"""The config system: types, unknown keys, overrides, the shipped configs and their sizes."""
import json
from pathlib import Path

import pytest
import torch

from dimba.config import ConfigError, config_from_dict, load_config
from dimba.model.build import count_parameters
from dimba.objectives import build_model
from dimba.training.engine import model_state_memory

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("data,message", [
    ({"model": {"d_modle": 3}}, "unknown config key 'model.d_modle'"),
    ({"training": {"lr": "fast"}}, "training.lr must be a number"),
    ({"training": {"lr": -1}}, "training.lr must be > 0"),
    ({"training": {"lr": float("inf")}}, "training.lr must be a finite number, got inf"),
    ({"deepspeed": {"train_micro_batch_size_per_gpu": 2, "zero_optimization": 3}},
     "deepspeed.zero_optimization must be an object"),
    ({"model": {"conditioning": "concat"}}, "model.conditioning must be one of 'film', 'additive'"),
    ({"diffusion": {"time_warp": "cdcd"}}, "diffusion.time_warp must be one of 'power', 'learned'"),
    ({"model": {"d_model": 100, "headdim": 64}}, "must be a multiple of model.headdim"),
    ({"objective": "ar"}, "model.bidirectional must be false"),
    ({"objective": "masked", "sampling": {"sampler": "ddim"}}, "sampling.sampler 'ddim' does not belong to objective 'masked'"),
    ({"model": {"kind": "diffusion"}}, "model.kind is gone"),
    ({"model": {"posterior_input": True}}, "model.posterior_input was removed"),
    ({"data": {"clean": {"none": 0.5}}}, "must sum to 1"),
    ({"deepspeed": {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}}}, "deepspeed.bf16 is set by DIMBA"),
    ({"deepspeed": {"train_micro_batch_size_per_gpu": 0}}, "train_micro_batch_size_per_gpu must be a positive integer"),
    ({"deepspeed": {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 4}}}, "stage must be 0, 1, 2 or 3"),
    ({"sampling": {"steps": 2000}}, "sampling.steps (2000) must be <= diffusion.num_steps"),
    ({"training": {"betas": [0.9]}}, "training.betas must have 2 items"),
    ({"bogus": {}}, "unknown config key 'bogus'"),
])
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(data)


def test_overrides_are_typed_and_validated():
    cfg = config_from_dict({}, ["training.lr=3e-4", "data.shards=/x/y", "model.bidirectional=false",
                                "deepspeed.zero_optimization.stage=3"])
    assert cfg.training.lr == 3e-4 and cfg.data.shards == "/x/y" and cfg.model.bidirectional is False
    assert cfg.zero_stage == 3
    with pytest.raises(ConfigError, match="training.max_steps must be an integer"):
        config_from_dict({}, ["training.max_steps=ten"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        config_from_dict({}, ["training.lr"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)
    bad.write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(bad)


def test_round_trip_through_json(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.json", ["training.max_steps=7"])
    again = config_from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.training.max_steps == 7


@pytest.mark.parametrize("name,claimed", [("tiny", None), ("125m", 125e6), ("350m", 350e6), ("1b", 1.0e9)])
def test_shipped_configs_build_on_meta_with_the_size_they_claim(name, claimed):
    cfg = load_config(ROOT / "configs" / f"{name}.json")
    with torch.device("meta"):
        model = build_model(cfg)
    n = count_parameters(model)
    mem = model_state_memory(cfg, model, gpus_per_node=8)
    print(f"{name}: {n / 1e6:.1f}M parameters; ZeRO-{cfg.zero_stage} model states on 8 GPUs: {mem / 2**30:.2f} GiB per GPU")
    if claimed is not None:
        assert abs(n - claimed) <= 0.1 * claimed, f"{name}.json builds {n / 1e6:.1f}M parameters"
    assert mem > 0
