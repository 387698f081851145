"""Loading checkpoints of the reference implementation (keys 'network.<DiT key>', docs/algorithm.md section 3)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from soflow_fast.checkpoint import load_consolidated
from soflow_fast.models.reference import load_reference_checkpoint


def reference_shapes(depth=2, H=64, p=2, C=3, grid=4, classes=10, null=True):
    """The reference DiT's state-dict keys and shapes, written from its architecture (timm PatchEmbed, Attention,
    Mlp; DiT's TimestepEmbedder x2, LabelEmbedder, FinalLayer), independently of our model."""
    shapes = {"pos_embed": (1, grid * grid, H), "x_embedder.proj.weight": (H, C, p, p), "x_embedder.proj.bias": (H,),
              "y_embedder.embedding_table.weight": (classes + int(null), H),
              "final_layer.linear.weight": (p * p * C, H), "final_layer.linear.bias": (p * p * C,),
              "final_layer.adaLN_modulation.1.weight": (2 * H, H), "final_layer.adaLN_modulation.1.bias": (2 * H,)}
    for e in ("t_embedder", "s_embedder"):
        shapes.update({f"{e}.mlp.0.weight": (H, 256), f"{e}.mlp.0.bias": (H,), f"{e}.mlp.2.weight": (H, H),
                       f"{e}.mlp.2.bias": (H,)})
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "attn.qkv.weight": (3 * H, H), b + "attn.qkv.bias": (3 * H,), b + "attn.proj.weight": (H, H),
                       b + "attn.proj.bias": (H,), b + "mlp.fc1.weight": (4 * H, H), b + "mlp.fc1.bias": (4 * H,),
                       b + "mlp.fc2.weight": (H, 4 * H), b + "mlp.fc2.bias": (H,),
                       b + "adaLN_modulation.1.weight": (6 * H, H), b + "adaLN_modulation.1.bias": (6 * H,)})
    return shapes


def reference_checkpoint(path, null=True, **kw):
    g = torch.Generator().manual_seed(0)
    state = {f"network.{k}": torch.randn(s, generator=g) * 0.05 for k, s in reference_shapes(null=null, **kw).items()}
    ema = {k: v + 1.0 for k, v in state.items()}  # distinguishable from the raw weights
    torch.save({"model": state, "ema_model": ema, "optimizer": {}, "finished_steps": 1234, "finished_epochs": 3}, path)
    return state, ema


@pytest.mark.parametrize("null", [True, False])
def test_every_tensor_lands_where_it_should(tmp_path, null):
    path = tmp_path / "ref.pt"
    state, ema = reference_checkpoint(path, null=null)
    for which, src in (("ema_model", ema), ("model", state)):
        model = load_reference_checkpoint(path, num_classes=10, which=which, num_heads=4)
        ours = model.state_dict()
        assert set(ours) == {k[len("network."):] for k in src}
        for k, v in src.items():
            assert torch.equal(ours[k[len("network."):]], v), k
        assert model.null_label == (10 if null else None)
        assert model.cfg.hidden_size == 64 and model.cfg.depth == 2 and model.cfg.input_size == 8


def test_heads_from_the_size_table(tmp_path):
    path = tmp_path / "ref.pt"
    reference_checkpoint(path, depth=2, H=64, p=2)  # DiT-T/2's shape: 4 heads from the table
    assert load_reference_checkpoint(path, num_classes=10).cfg.num_heads == 4


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.pop("network.blocks.1.mlp.fc2.bias"), "blocks.1.mlp.fc2.bias"),
    (lambda s: s.__setitem__("network.blocks.0.attn.extra", torch.zeros(1)), "unknown key 'blocks.0.attn.extra'"),
    (lambda s: s.__setitem__("network.blocks.0.attn.proj.bias", torch.zeros(65)), "blocks.0.attn.proj.bias.*shape"),
    (lambda s: s.__setitem__("blocks.0.attn.proj.bias", s.pop("network.blocks.0.attn.proj.bias")), "prefix"),
])
def test_bad_checkpoints_name_the_key(tmp_path, mutate, message):
    path = tmp_path / "ref.pt"
    state, ema = reference_checkpoint(path)
    mutate(ema)
    torch.save({"model": state, "ema_model": ema}, path)
    with pytest.raises((KeyError, ValueError), match=message):
        load_reference_checkpoint(path, num_classes=10, num_heads=4)


def test_wrong_class_count_and_foreign_files(tmp_path):
    path = tmp_path / "ref.pt"
    reference_checkpoint(path)
    with pytest.raises(ValueError, match="label table has 11 rows"):
        load_reference_checkpoint(path, num_classes=1000, num_heads=4)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_reference_checkpoint(bad, num_classes=10)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_reference_checkpoint(tmp_path / "missing.pt", num_classes=10)


def test_cli_import_then_sample(tmp_path):
    ref = tmp_path / "ref.pt"
    state, ema = reference_checkpoint(ref)
    ours = tmp_path / "ours.pt"
    def run(*a):
        return subprocess.run([sys.executable, "-m", "soflow_fast", *a], capture_output=True, text=True)
    r = run("import-checkpoint", str(ref), str(ours), "--num-classes", "10", "--num-heads", "4")
    assert r.returncode == 0, r.stderr
    ck = load_consolidated(ours)
    assert ck["step"] == 1234 and torch.equal(ck["ema"]["blocks.1.mlp.fc1.weight"],
                                              ema["network.blocks.1.mlp.fc1.weight"])
    r = run("sample", str(ours), "--out", str(tmp_path / "s"), "--num-samples", "12", "--nfe", "2", "--labels", "3,4",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    npz = np.load(tmp_path / "s" / "samples_2nfe.npz")
    assert npz["arr_0"].shape == (12, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
    assert list(npz["arr_1"][:4]) == [3, 4, 3, 4]
    assert (tmp_path / "s" / "samples_2nfe.png").exists()
    r = run("sample", str(ref), "--out", str(tmp_path / "s2"))  # a reference file given to sample: clear error
    assert r.returncode == 2 and "import-checkpoint" in r.stderr


def test_import_reads_the_reference_yaml_with_its_loader_keys(tmp_path, capsys):
    """The reference's imagenet.yaml sets num_workers and prefetch_factor, which `train` rejects; the import takes
    only the flow and the classes from it, so the file is read as it is."""
    import yaml

    from soflow_fast.cli import main

    reference_checkpoint(tmp_path / "ref.pt")
    (tmp_path / "imagenet.yaml").write_text(yaml.safe_dump({"noising_type": "Trig", "num_classes": 10,
                                                            "num_workers": 8, "prefetch_factor": 4}))
    assert main(["import-checkpoint", str(tmp_path / "ref.pt"), str(tmp_path / "ours.pt"), "--config",
                 str(tmp_path / "imagenet.yaml"), "--num-heads", "4"]) == 0, capsys.readouterr().err
    ck = load_consolidated(tmp_path / "ours.pt")
    assert ck["flow"] == {"noising": "trig", "coefficient": "euler"} and ck["step"] == 1234
