"""DeepSpeed config rewriting for a target setting: only the switched keys change, impossible
requests are refused before anything happens, implied changes are said. No DeepSpeed needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainwarden.adapters.deepspeed.config import (
    ConfigError,
    Setting,
    load_config,
    micro_batch_choices,
    resolve,
    rewrite,
    setting_of,
)

USER = {
    "train_batch_size": 32,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
    "fp16": {"enabled": True, "loss_scale_window": 500, "hysteresis": 4},
    "zero_optimization": {
        "stage": 2,
        "reduce_bucket_size": 12345,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
    },
    "data_types": {"grad_accum_dtype": "fp32"},
}


def test_setting_of_reads_what_the_config_sets() -> None:
    s = setting_of(USER, world_size=2)
    assert s == Setting(2, "fp16", True, False, 4, 4, 32)
    assert setting_of({"train_batch_size": 8, "bfloat16": {"enabled": True}}, 1).precision == "bf16"
    assert (
        setting_of(
            {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 2
        ).train_batch_size
        == 12
    )
    with pytest.raises(ConfigError):
        setting_of({"zero_optimization": {"stage": 1}}, 1)


def test_rewrite_changes_only_the_switched_keys() -> None:
    base = setting_of(USER, 2)
    target, implied = resolve(base, zero_stage=3, precision="bf16", offload_param=True, world_size=2)
    assert implied == []
    out = rewrite(USER, target)
    assert out["zero_optimization"] == {
        "stage": 3,
        "reduce_bucket_size": 12345,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu"},
    }
    assert out["bf16"] == {"enabled": True}
    assert out["fp16"] == {"enabled": False, "loss_scale_window": 500, "hysteresis": 4}  # kept for later
    for key in ("gradient_clipping", "optimizer", "scheduler"):
        assert out[key] == USER[key]
    assert "zero_force_ds_cpu_optimizer" not in out
    assert USER["zero_optimization"]["stage"] == 2  # the user's dict is untouched
    back = rewrite(out, resolve(setting_of(out, 2), zero_stage=2, precision="fp32", world_size=2)[0])
    assert "offload_param" not in back["zero_optimization"] and "grad_accum_dtype" not in back["data_types"]
    assert rewrite(USER, base, client_optimizer=True)["zero_force_ds_cpu_optimizer"] is False


def test_resolve_refuses_the_impossible_and_says_what_it_implies() -> None:
    base = Setting(3, "fp32", True, True, 4, 2, 8)
    target, implied = resolve(base, zero_stage=1)
    assert (target.offload_param, target.offload_optimizer) == (False, True)
    assert implied == ["offload_param True -> False (parameter offload needs ZeRO stage 3)"]
    target, implied = resolve(base, zero_stage=0)
    assert not target.offload_optimizer and len(implied) == 2
    with pytest.raises(ConfigError, match="needs ZeRO stage 3"):
        resolve(base, zero_stage=2, offload_param=True)
    with pytest.raises(ConfigError, match="needs ZeRO stage 1, 2 or 3"):
        resolve(base, zero_stage=0, offload_optimizer=True)
    with pytest.raises(ConfigError, match="not supported on this device"):
        resolve(base, precision="fp16", precisions=("fp32", "bf16"))
    with pytest.raises(ConfigError, match="zero_stage"):
        resolve(base, zero_stage=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="true or false"):
        resolve(base, offload_optimizer="yes")  # type: ignore[arg-type]


def test_micro_batch_keeps_the_global_batch() -> None:
    base = Setting(1, "fp32", False, False, 4, 4, 32)
    assert micro_batch_choices(32, 2) == (1, 2, 4, 8, 16)
    target, _ = resolve(base, micro_batch_size=2, world_size=2)
    assert (target.micro_batch_size, target.gradient_accumulation_steps, target.train_batch_size) == (
        2,
        8,
        32,
    )
    out = rewrite({"train_batch_size": 32}, target)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) == (2, 8)
    with pytest.raises(ConfigError, match="valid: 1, 2, 4, 8, 16"):
        resolve(base, micro_batch_size=3, world_size=2)


def test_load_config_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(USER))
    assert load_config(str(path)) == USER
    with pytest.raises(ConfigError, match="needs a config"):
        load_config(None)
