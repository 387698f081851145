"""Config validation: the reference's keys mean the same; bad values name the key."""
import pytest
import yaml

from soflow_fast.config import ConfigError, TrainConfig, load_config, parse_override

# The reference's imagenet.yaml, less its DataLoader keys num_workers: 8 and prefetch_factor: 4, which this trainer
# rejects (test_unused_loader_keys_are_rejected).
REFERENCE_IMAGENET = """
working_dir: ./your_experiment_name
noising_type: Linear # 'Linear', 'Triangular'
coefficient_type: Euler
model_type: DiT-B-4
dataset_type: Imagenet
data_size: 32
dataset_path: ./imagenet_latent
velocity_loss_ratio: 0.75
p: 1.0
eps: 0.01
time_mean: [-0.2, -1.0, 0.2]
time_std: [1.0, 0.8, 0.8]
cfg_scale: 3.0
mix_ratio: 0.25
cfg_drop_rate: 0.1
cfg_decay_time: 0.8
l_schedule: Exponent
l_init_ratio: 0.1
l_end_ratio: 0.002
total_steps: 400000
ema_decay_rate: 0.9999
learning_rate: 0.0001
betas: [0.9, 0.99]
weight_decay: 0.0
batch_size: 256
eval_steps: 25000
eval_batch_size: 125
eval_NFE: 1
eval_demo_steps: 1000
eval_demo_shape: [4, 8]
ckpt_saving_steps: 25000
logging_steps: 100
seed: 42
"""


def test_reference_config_parses_with_the_same_meaning(tmp_path):
    path = tmp_path / "imagenet.yaml"
    path.write_text(REFERENCE_IMAGENET)
    cfg = load_config(path)
    hp = cfg.hparams
    assert (hp.cfg_scale, hp.mix_ratio, hp.cfg_drop_rate, hp.cfg_decay_time) == (3.0, 0.25, 0.1, 0.8)
    assert hp.time_mean == (-0.2, -1.0, 0.2) and hp.l_schedule == "exponent" and hp.total_steps == 400000
    assert cfg.flow.noising == "linear" and cfg.model_type == "DiT-B-4"


def test_shipped_configs_parse():
    import pathlib

    for p in pathlib.Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"):
        load_config(p)


def _with(**kw):
    raw = yaml.safe_load(REFERENCE_IMAGENET)
    raw.update(kw)
    return raw


@pytest.mark.parametrize("change,key", [
    (dict(cfg_drop_rate=0.0), "cfg_drop_rate"),
    (dict(velocity_loss_ratio=1.5), "velocity_loss_ratio"),
    (dict(l_end_ratio=0.0), "l_end_ratio"),
    (dict(l_schedule="Quadratic"), "l_schedule"),
    (dict(noising_type="Cosine"), "noising_type"),
    (dict(model_type="DiT-Q/9"), "model_type"),
    (dict(batch_size="256"), "batch_size"),
    (dict(time_mean=[0.0, 1.0]), "time_mean"),
    (dict(betas=[0.9, 1.2]), "betas"),
    (dict(learning_rate=True), "learning_rate"),
    (dict(kernels="cuda"), "kernels"),
    (dict(on_nonfinite="ignore"), "on_nonfinite"),
    (dict(cfg_scale=0.5), "cfg_scale"),
    (dict(total_steps=0), "total_steps"),
    (dict(lr_schedule="step"), "lr_schedule"),
    (dict(lr_warmup_steps=-1), "lr_warmup_steps"),
    (dict(lr_warmup_steps=400000), "lr_warmup_steps"),  # = total_steps: no step left after the warm-up
    (dict(lr_end_ratio=0.1), "lr_end_ratio"),  # with the constant schedule it would be ignored
    (dict(lr_schedule="linear", lr_end_ratio=1.5), "lr_end_ratio"),
    (dict(learing_rate=1e-4), "learing_rate"),  # a typo is an unknown key, not silently ignored
])
def test_bad_values_name_the_key(change, key):
    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_dict(_with(**change))


def test_triangular_alias_and_int_for_float():
    cfg = TrainConfig.from_dict(_with(noising_type="Triangular", coefficient_type="Triangular", p=1, eps=1))
    assert cfg.flow.noising == "trig" and cfg.flow.coefficient == "trig" and isinstance(cfg.p, float)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


@pytest.mark.parametrize("value", ["auto", "none", "blocks", "model"])
def test_compile_modes(value):
    assert TrainConfig.from_dict(_with(compile=value)).compile == value


@pytest.mark.parametrize("value,message", [
    (True, r"compile = True: booleans are gone; use one of \['auto', 'none', 'blocks', 'model', 'step'\] \(true was "
           "blocks"),
    (False, "compile = False: booleans are gone"),
    ("fast", r"compile = 'fast': expected one of \['auto', 'none', 'blocks', 'model', 'step'\]"),
])
def test_compile_rejects_booleans_and_unknown_modes(value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(_with(compile=value))


def test_compile_blocks_needs_a_dit():
    with pytest.raises(ConfigError, match="compile = 'blocks': 'blocks' compiles each DiT block; the U-Net has none"):
        TrainConfig.from_dict(_with(compile="blocks", model_type="UNet-T", dataset_type="CIFAR10", num_classes=0,
                                    cfg_scale=1.0))
    assert TrainConfig.from_dict(_with(compile="model", model_type="UNet-T", dataset_type="CIFAR10", num_classes=0,
                                       cfg_scale=1.0)).compile == "model"


def test_reshard_after_forward_values():
    for value in ("auto", True, False):
        assert TrainConfig.from_dict(_with(reshard_after_forward=value)).reshard_after_forward == value
    with pytest.raises(ConfigError, match="reshard_after_forward = 'yes': expected auto, true or false"):
        TrainConfig.from_dict(_with(reshard_after_forward="yes"))
    with pytest.raises(ConfigError, match="reshard_after_forward = 1: expected bool or str"):
        TrainConfig.from_dict(_with(reshard_after_forward=1))


def test_attention_modes():
    for value in ("auto", "sdpa", "flash-attn", "cudnn", "flash", "efficient", "math"):
        assert TrainConfig.from_dict(_with(attention=value)).attention == value
    with pytest.raises(ConfigError, match=r"attention = 'xformers': expected one of \['auto', 'sdpa', 'flash-attn'"):
        TrainConfig.from_dict(_with(attention="xformers"))
    with pytest.raises(ConfigError, match="attention = 'math': the U-Net's attention is chosen per call"):
        TrainConfig.from_dict(_with(attention="math", model_type="UNet-T", dataset_type="CIFAR10", num_classes=0,
                                    cfg_scale=1.0))


def test_cuda_graphs_is_a_bool_off_by_default():
    assert TrainConfig().cuda_graphs is False
    with pytest.raises(ConfigError, match="cuda_graphs = 'yes': expected bool"):
        TrainConfig.from_dict(_with(cuda_graphs="yes"))


@pytest.mark.parametrize("text,want", [("1e-4", 1e-4), ("3E5", 3e5), ("2.5e-3", 2.5e-3), (".5e1", 5.0),
                                       ("1.0e4", 1e4)])
def test_exponent_floats_read_as_numbers_in_files_and_set(tmp_path, text, want):
    """YAML 1.1 reads 1e-4 as a string; the config loader reads it as YAML 1.2 does, in files and in --set."""
    path = tmp_path / "c.yaml"
    path.write_text(REFERENCE_IMAGENET.replace("learning_rate: 0.0001", f"learning_rate: {text}"))
    assert load_config(path).learning_rate == want
    assert load_config(path, dict([parse_override(f"eps={text}")])).eps == want
    assert parse_override(f"time_mean=[-{text}, 0, {text}]") == ("time_mean", [-want, 0, want])


def test_exponent_strings_stay_strings_where_quoted():
    with pytest.raises(ConfigError, match="learning_rate = '1e-4': expected float"):
        TrainConfig.from_dict(_with(learning_rate="1e-4"))


@pytest.mark.parametrize("key,value", [("num_workers", 8), ("prefetch_factor", 4), ("num_workers", 1)])
def test_unused_loader_keys_are_rejected(key, value):
    with pytest.raises(ConfigError, match=rf"^config: {key} = {value}: not used: the trainer's loaders run without "
                                          "worker processes; remove the key$"):
        TrainConfig.from_dict(_with(**{key: value}))
    assert TrainConfig.from_dict(_with(num_workers=0, prefetch_factor=2)).num_workers == 0


def test_choices_come_from_the_consuming_modules():
    from typing import get_args, get_type_hints

    from soflow_fast import attention, kernel_ops, optim, parallel, precision

    hints = get_type_hints(TrainConfig)
    assert get_args(hints["attention"]) == attention.ATTENTION_MODES
    assert get_args(hints["kernels"]) == kernel_ops.KERNEL_MODES
    assert get_args(hints["compile"]) == parallel.COMPILE_MODES
    assert get_args(hints["parallel"]) == parallel.PARALLEL_MODES
    assert get_args(hints["device"]) == parallel.DEVICES
    assert get_args(hints["precision"]) == precision.PRECISIONS
    assert get_args(hints["optimizer"]) == ("auto", *optim.KINDS)
    with pytest.raises(ConfigError, match=r"optimizer = 'sgd': expected one of \['auto', 'adamw', 'radam'"):
        TrainConfig.from_dict(_with(optimizer="sgd"))


def test_help_config_lists_every_key_with_type_default_and_doc(capsys):
    import dataclasses

    from soflow_fast.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--help-config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "learning_rate: float = 0.0001\n    optimizer learning rate\n" in out
    assert 'kernels: auto | triton | eager = "eager"\n' in out
    assert "num_classes: int or null = null\n" in out
    assert 'reshard_after_forward: bool or auto = "auto"\n' in out
    assert "seed: int = 42\n    seed of initialization, data order and noise [fixed for a run: a resume" in out
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["doc"], f.name
        assert f"\n{f.name}: " in "\n" + out
