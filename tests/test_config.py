"""The run config documents itself, refuses what it must, and takes KEY=VALUE overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError
from realign.config import (
    DEFAULT_MAX_LENGTH,
    DPO_OWNED_KEYS,
    REWARD_OWNED_KEYS,
    RunConfig,
    apply_overrides,
    load_config,
)
from realign.errors import InputError


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    """Every field of ``model`` and of its nested models, as (dotted name, FieldInfo)."""
    out: list[tuple[str, object]] = []
    for name, info in model.model_fields.items():
        out.append((prefix + name, info))
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _fields(ann, f"{prefix}{name}.")
    return out


ALL_FIELDS = _fields(RunConfig)


def test_every_field_has_a_description():
    assert len(ALL_FIELDS) >= 66
    missing = [name for name, info in ALL_FIELDS if not (info.description or "").strip()]
    assert not missing, f"fields without a description: {missing}"


@pytest.mark.parametrize("name, info", ALL_FIELDS, ids=[n for n, _ in ALL_FIELDS])
def test_description_states_the_true_default(name, info):
    """Each description ends with 'Default: X.' where X (read as YAML) is the default;
    sections (nested models) and the required ``data`` excepted."""
    if info.is_required():
        assert "Required" in info.description
        return
    default = info.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        return
    assert "Default: " in info.description, name
    text = info.description.rsplit("Default: ", 1)[1].rstrip(".")
    assert yaml.safe_load(text) == default, f"{name}: says {text!r}, code {default!r}"


def test_max_length_defaults_share_one_constant():
    cfg = RunConfig(data="x.jsonl")
    assert DEFAULT_MAX_LENGTH == 256
    assert cfg.sft.max_length == cfg.reward.max_length == cfg.dpo.max_length == DEFAULT_MAX_LENGTH


def _yaml(tmp_path: Path, text: str = "") -> Path:
    p = tmp_path / "run.yaml"
    p.write_text("data: x.jsonl\n" + text, encoding="utf-8")
    return p


def test_dpo_extra_owned_key_refused_naming_it(tmp_path):
    with pytest.raises(ValidationError, match=r"dpo\.extra\.beta: set dpo\.beta instead"):
        RunConfig(data="x.jsonl", dpo={"extra": {"beta": 0.3}})
    p = _yaml(tmp_path, "dpo:\n  extra:\n    label_smoothing: 0.1\n    beta: 0.3\n")
    with pytest.raises(InputError) as e:
        load_config(p)
    assert e.value.field == "dpo.extra.beta" and e.value.line == 5
    assert "set dpo.beta instead" in e.value.message
    assert not e.value.message.startswith("Value error")


@pytest.mark.parametrize("key", sorted(DPO_OWNED_KEYS))
def test_every_dpo_owned_key_refused(key):
    with pytest.raises(ValidationError, match=rf"dpo\.extra\.{key}:"):
        RunConfig(data="x.jsonl", dpo={"extra": {key: 1}})


def test_reward_extra_owned_key_refused(tmp_path):
    with pytest.raises(ValidationError, match=r"reward\.extra\.output_dir"):
        RunConfig(data="x.jsonl", reward={"extra": {"output_dir": "x"}})
    for key in REWARD_OWNED_KEYS:
        with pytest.raises(ValidationError, match=rf"reward\.extra\.{key}:"):
            RunConfig(data="x.jsonl", reward={"extra": {key: 1}})


def test_owned_key_sets():
    assert {"beta", "max_length", "loss_type", "learning_rate", "per_device_train_batch_size",
            "gradient_accumulation_steps", "max_steps", "num_train_epochs", "warmup_steps",
            "output_dir", "logging_dir", "save_steps", "save_strategy", "report_to", "seed",
            "use_cpu"} <= DPO_OWNED_KEYS
    assert {"learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
            "max_steps", "num_train_epochs", "max_length", "output_dir", "logging_dir",
            "save_steps", "save_strategy", "seed", "use_cpu", "report_to"} <= REWARD_OWNED_KEYS


def test_owned_keys_match_what_the_code_sets(monkeypatch):
    """dpo_config sets every owned key (logging_dir aside: not a field of transformers 5)
    and, besides them, only realign's overridable defaults: a new key there must be
    sorted into one or the other."""
    trl = pytest.importorskip("trl")
    from realign.backends.trl_train import dpo_config

    monkeypatch.setattr(trl, "DPOConfig", lambda **kw: kw)
    kw = dpo_config(Path("out"), beta=0.3, loss_type="ipo", learning_rate=1e-3, batch_size=3,
                    gradient_accumulation_steps=2, max_steps=7, num_epochs=2.0, max_length=99,
                    seed=5, save_every=11, use_cpu=True)
    assert DPO_OWNED_KEYS - {"logging_dir"} <= set(kw)
    assert set(kw) - DPO_OWNED_KEYS == {"logging_steps", "save_total_limit",
                                        "precompute_ref_log_probs", "disable_tqdm",
                                        "dataloader_num_workers", "remove_unused_columns"}


def test_unowned_extra_keys_accepted():
    cfg = RunConfig(data="x.jsonl", dpo={"extra": {"rpo_alpha": 0.5, "ld_alpha": 0.5}},
                    reward={"extra": {"gradient_checkpointing": True}})
    assert cfg.dpo.extra == {"rpo_alpha": 0.5, "ld_alpha": 0.5}
    assert cfg.reward.extra == {"gradient_checkpointing": True}


def test_lora_task_type_refused():
    with pytest.raises(ValidationError, match=r"dpo\.lora\.task_type"):
        RunConfig(data="x.jsonl", dpo={"lora": {"r": 8, "task_type": "SEQ_CLS"}})
    RunConfig(data="x.jsonl", dpo={"lora": {"r": 8}}, reward={"lora": {"r": 4}})


def test_min_pairs_above_max_pairs_refused(tmp_path):
    with pytest.raises(ValidationError, match="must not exceed"):
        RunConfig(data="x.jsonl", heldout={"min_pairs": 300, "max_pairs": 256})
    p = _yaml(tmp_path, "heldout:\n  min_pairs: 64\n  max_pairs: 32\n")
    with pytest.raises(InputError) as e:
        load_config(p)
    assert e.value.field == "heldout.min_pairs" and e.value.line == 3 and e.value.file
    # caused by an override: the override is named
    p = _yaml(tmp_path, "heldout:\n  min_pairs: 64\n")
    with pytest.raises(InputError) as e:
        load_config(p, ["heldout.max_pairs=32"])
    assert "heldout.max_pairs=32" in e.value.message and e.value.file is None


@pytest.mark.parametrize("values", [
    {"seed": -1}, {"dpo": {"max_steps": -2}}, {"dpo": {"num_epochs": 0}},
    {"sft": {"learning_rate": 0}}, {"sft": {"max_length": 4}}, {"sft": {"benchmark_limit": 0}},
    {"reward": {"max_steps": -5}}, {"dpo": {"loss_type": []}}, {"score_scale": "ten"},
])
def test_meaningless_values_refused(values):
    with pytest.raises(ValidationError):
        RunConfig(data="x.jsonl", **values)


def test_overrides_applied_before_validation(tmp_path):
    p = _yaml(tmp_path, "dpo:\n  beta: 0.1\n  max_steps: 10\nsft:\n  benchmarks: [realign_arith]\n")
    cfg = load_config(p, ["dpo.beta=0.2", "kl_monitor.on_breach=stop", "stages=[dpo,evaluation]",
                          "sft.benchmarks=[]", "thresholds.min_pairs=300", "dpo.lora.r=8",
                          "dpo.extra.ld_alpha=0.5", "run_id=", "dpo.beta=0.25"])
    assert cfg.dpo.beta == 0.25  # the later override wins
    assert cfg.dpo.max_steps == 10  # the file's other keys stay
    assert cfg.kl_monitor.on_breach == "stop"
    assert cfg.stages == ["dpo", "evaluation"]
    assert cfg.sft.benchmarks == []
    assert cfg.thresholds == {"min_pairs": 300.0}
    assert cfg.dpo.lora == {"r": 8} and cfg.dpo.extra == {"ld_alpha": 0.5}
    assert cfg.run_id is None
    assert load_config(p, ["dpo.beta=0.2"]).dpo.beta == 0.2
    assert load_config(p).dpo.beta == 0.1


def test_apply_overrides_copies():
    data = {"data": "x.jsonl", "dpo": {"beta": 0.1}}
    out = apply_overrides(data, ["dpo.beta=0.2", "kl_monitor.every=5"])
    assert out == {"data": "x.jsonl", "dpo": {"beta": 0.2}, "kl_monitor": {"every": 5}}
    assert data == {"data": "x.jsonl", "dpo": {"beta": 0.1}}


def test_override_wrong_type(tmp_path):
    with pytest.raises(InputError) as e:
        load_config(_yaml(tmp_path), ["dpo.beta=abc"])
    assert e.value.field == "dpo.beta" and "dpo.beta=abc" in e.value.message
    assert "command line" in e.value.message and e.value.file is None
    with pytest.raises(InputError) as e:
        load_config(_yaml(tmp_path), ["kl_monitor.on_breach=explode"])
    assert e.value.field == "kl_monitor.on_breach"
    with pytest.raises(InputError) as e:
        load_config(_yaml(tmp_path), ["dpo.loss_type=5"])
    assert e.value.field == "dpo.loss_type"  # pydantic's union tags trimmed
    with pytest.raises(InputError) as e:
        load_config(_yaml(tmp_path), ["thresholds.nope=1"])
    assert "unknown gate" in e.value.message and "thresholds.nope=1" in e.value.message
    with pytest.raises(InputError, match=r"dpo\.extra\.beta: set dpo\.beta.*command line"):
        load_config(_yaml(tmp_path), ["dpo.extra.beta=0.3"])


@pytest.mark.parametrize("item, field", [
    ("dpo.nope=1", "dpo.nope"),
    ("dpo.betta=0.2", "dpo.betta"),
    ("nope=1", "nope"),
    ("dpo.beta.x=1", "dpo.beta.x"),  # through a single value
    ("stages.0=dpo", "stages.0"),  # through a list
    ("dpo.beta", "dpo.beta"),  # no '='
    ("dpo..beta=1", "dpo..beta"),
    ("stages=[dpo", "stages"),  # not YAML
])
def test_bad_override_refused_naming_it(tmp_path, item, field):
    with pytest.raises(InputError) as e:
        load_config(_yaml(tmp_path), [item])
    assert e.value.field == field
    assert item in e.value.message and "command line" in e.value.message


def test_override_through_a_non_mapping_value_in_the_file(tmp_path):
    p = _yaml(tmp_path, "dpo:\n  lora: 5\n")
    with pytest.raises(InputError) as e:
        load_config(p, ["dpo.lora.r=8"])
    assert e.value.field == "dpo.lora.r" and "not a mapping" in e.value.message


def test_file_errors_keep_file_and_line(tmp_path):
    p = _yaml(tmp_path, "dpo:\n  beta: -1\n")
    with pytest.raises(InputError) as e:
        load_config(p, ["kl_monitor.every=5"])  # an unrelated override
    assert e.value.field == "dpo.beta" and e.value.line == 3 and e.value.file == str(p)
    p.write_text("data: x.jsonl\ndpo: [unclosed\n", encoding="utf-8")
    with pytest.raises(InputError, match="invalid YAML") as e:
        load_config(p, ["dpo.beta=0.2"])
    assert e.value.line is not None
