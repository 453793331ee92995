"""Trainable parts: what trains, what travels, what stays frozen, and what the tail computes."""

from __future__ import annotations

import dataclasses
import importlib
import math

import numpy as np
import pytest
import torch
from torch import nn

from ferry.client import dp_randomness
from ferry.client.dp_trainer import DPTrainConfig, predict_tail, train_tail
from ferry.common.adapters import ConvAdapter, LoRALinear
from ferry.common.backbones import build_backbone
from ferry.common.backbones.registry import backbone_spec
from ferry.common.errors import FerryError
from ferry.common.privacy.accounting import epsilon_for_history
from ferry.common.trainable import (
    TrainableSpec,
    load_trainable_state,
    set_train_mode,
    split_model,
    trainable_state,
)

from reference_fedavg import fedavg

DP = DPTrainConfig(noise_multiplier=1.0, batch_size=8, lr=0.5)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def same_draws(monkeypatch):
    """Every round draws the same sampling and noise (a fixed seed in place of OS entropy):
    how a test compares two implementations of one mechanism. Ferry itself has no such mode
    (``tests/test_attack_operator_noise.py``)."""

    def fixed(device="cpu"):
        return torch.Generator(device=torch.device(device)).manual_seed(0)

    monkeypatch.setattr(dp_randomness, "round_generator", fixed)


def _cnn():
    """ferry-cnn with non-trivial BatchNorm statistics and affines (as after pretraining)."""
    torch.manual_seed(0)
    backbone = build_backbone("ferry-cnn").eval()
    gen = torch.Generator().manual_seed(1)
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.5, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            if m.weight is not None:
                m.weight.data.uniform_(0.5, 1.5, generator=gen)
                m.bias.data.normal_(0, 0.2, generator=gen)
    return backbone, backbone_spec("ferry-cnn")


def _tiny_vit(dropout: float = 0.0):
    """A 2-block torchvision ViT (32 px, patch 16, width 64) staged like ``vit_b_16``."""
    from torchvision.models.vision_transformer import VisionTransformer

    from ferry.common.backbones.vit_b_16 import vit_stages

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=32,
        patch_size=16,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        mlp_dim=128,
        dropout=dropout,
        attention_dropout=dropout,
    )
    spec = dataclasses.replace(
        backbone_spec("vit_b_16"),
        name="tiny-vit",
        feature_dim=64,
        input_shape=(3, 32, 32),
        last_stage="block1",
        lora_targets=("block1.self_attention.qlinear", "block1.self_attention.vlinear"),
    )
    return vit_stages(vit).eval(), spec


def _data(shape, n=24, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, classes, n)


def _activations(split, x):
    with torch.no_grad():
        return split.trunk(torch.from_numpy(x)).numpy()


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_identical(before: dict, module: nn.Module) -> None:
    after = module.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


# --- each part trains, and only its arrays travel ---------------------------------------


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("head", {"weight", "bias"}),
        ("conv-adapter", {"12.down.weight", "12.up.weight", "output.weight", "output.bias"}),
        ("last-block", {"12.weight", "output.weight", "output.bias"}),
    ],
)
def test_cnn_part_trains_under_dp_and_releases_only_its_trainable_arrays(kind, names):
    backbone, spec = _cnn()
    original = _snapshot(backbone)
    split = split_model(backbone, spec, TrainableSpec(kind=kind), 3)
    x, y = _data((1, 32, 32))
    acts = _activations(split, x)
    before = trainable_state(split.tail)
    frozen = {k: v.clone() for k, v in split.tail.named_parameters() if not v.requires_grad}

    outcome = train_tail(split.tail, acts, y, DP)

    assert outcome.segment is not None and outcome.segment.steps == 3
    assert epsilon_for_history([outcome.segment], 1e-5) > 0
    trainable = {k for k, p in split.tail.named_parameters() if p.requires_grad}
    assert set(outcome.trainable_state) == trainable
    if kind != "last-block":  # the last block's conv is a stage the backbone numbers
        assert set(outcome.trainable_state) == names
    else:
        assert names <= set(outcome.trainable_state)
    for k, v in outcome.trainable_state.items():
        assert not np.array_equal(v, before[k]), f"{k} did not train"
    for k, v in split.tail.named_parameters():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"frozen {k} changed"
    _assert_identical(original, backbone)  # trunk (and the backbone it came from) untouched
    assert all(not p.requires_grad for p in split.trunk.parameters())
    assert not split.trunk.training


def _per_example_state_at_each_step(tail: nn.Module, train) -> list[dict[str, set[str]]]:
    """Run ``train()``; at each optimizer step (inside Opacus' step, before gradients are
    cleared) record which per-example attributes each parameter of ``tail`` holds."""
    steps: list[dict[str, set[str]]] = []

    def inspect(optimizer, args, kwargs):
        steps.append(
            {
                name: {
                    a for a in ("grad_sample", "_norm_sample") if getattr(p, a, None) is not None
                }
                for name, p in tail.named_parameters()
            }
        )

    optim = importlib.import_module("torch.optim.optimizer")
    hook = optim.register_optimizer_step_pre_hook(inspect)
    try:
        train()
    finally:
        hook.remove()
    return steps


@pytest.mark.parametrize("model", ["cnn-conv-adapter", "vit-lora"])
def test_frozen_parameters_get_no_per_example_gradients(model):
    backbone, spec = _cnn() if model.startswith("cnn") else _tiny_vit()
    kind = model.split("-", 1)[1]
    split = split_model(backbone, spec, TrainableSpec(kind=kind, lora_rank=4), 3)
    x, y = _data(spec.input_shape, n=16)
    acts = _activations(split, x)

    steps = _per_example_state_at_each_step(split.tail, lambda: train_tail(split.tail, acts, y, DP))

    trainable = {k for k, p in split.tail.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(dict(split.tail.named_parameters()))
    assert len(steps) == 2
    for step in steps:
        assert {k for k, attrs in step.items() if attrs} == trainable
        assert all(attrs == {"grad_sample"} for k, attrs in step.items() if k in trainable)


def test_lora_on_a_staged_vit_trains_only_lora_factors_and_head():
    backbone, spec = _tiny_vit()
    original = _snapshot(backbone)
    split = split_model(backbone, spec, TrainableSpec(kind="lora", lora_rank=4), 3)
    x, y = _data((3, 32, 32))
    acts = _activations(split, x)
    frozen = {k: v.clone() for k, v in split.tail.named_parameters() if not v.requires_grad}

    outcome = train_tail(split.tail, acts, y, DP)

    assert split.split == "block1" and acts.shape[1:] == (5, 64)
    assert set(outcome.trainable_state) == {
        f"block1.self_attention.{proj}.lora_{f}.weight"
        for proj in ("qlinear", "vlinear")
        for f in "AB"
    } | {"output.weight", "output.bias"}
    assert outcome.trainable_state["block1.self_attention.qlinear.lora_A.weight"].shape == (4, 64)
    assert epsilon_for_history([outcome.segment], 1e-5) > 0
    for k, v in split.tail.named_parameters():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"frozen {k} changed"
    _assert_identical(original, backbone)


def test_lora_on_the_registry_vit_b_16_at_32px_targets_its_last_two_blocks():
    from ferry.common.backbones.vit_b_16 import LORA_TARGETS

    torch.manual_seed(0)
    backbone = build_backbone("vit_b_16", (3, 32, 32)).eval()
    split = split_model(backbone, backbone_spec("vit_b_16"), TrainableSpec(kind="lora"), 2)
    x, y = _data((3, 32, 32), n=12, classes=2)

    outcome = train_tail(split.tail, _activations(split, x), y, DP)

    assert split.split == "block10"
    wrapped = {k.rsplit(".lora_", 1)[0] for k in outcome.trainable_state if ".lora_" in k}
    assert wrapped == set(LORA_TARGETS)
    assert epsilon_for_history([outcome.segment], 1e-5) > 0


# --- what travels round-trips through aggregation ---------------------------------------


@pytest.mark.parametrize("model", ["cnn-conv-adapter", "vit-lora"])
def test_fedavg_of_two_clients_loads_into_a_fresh_split(model):
    backbone, spec = _cnn() if model.startswith("cnn") else _tiny_vit()
    part = TrainableSpec(kind=model.split("-", 1)[1], lora_rank=4)
    start = trainable_state(split_model(backbone, spec, part, 3).tail)
    updates = []
    for client in (0, 1):
        split = split_model(backbone, spec, part, 3)
        load_trainable_state(split.tail, start)
        x, y = _data(spec.input_shape, n=16 + 8 * client, seed=client)
        outcome = train_tail(split.tail, _activations(split, x), y, DP)
        updates.append((outcome.trainable_state, outcome.num_examples))
    averaged = fedavg(updates)

    fresh = split_model(backbone, spec, part, 3, seed=7)  # different initial arrays
    load_trainable_state(fresh.tail, averaged)
    client_tail = split_model(backbone, spec, part, 3).tail
    load_trainable_state(client_tail, averaged)

    got = trainable_state(fresh.tail)
    assert set(got) == set(averaged)
    for k, v in averaged.items():
        np.testing.assert_array_equal(got[k], v)
        want = (updates[0][0][k] * 16.0 + updates[1][0][k] * 24.0) / 40.0
        np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-6)
    x, _ = _data(spec.input_shape, n=8, seed=5)
    acts = _activations(fresh, x)
    np.testing.assert_array_equal(predict_tail(fresh.tail, acts), predict_tail(client_tail, acts))


# --- round 0 is the pretrained model ----------------------------------------------------


def test_conv_adapters_at_round_zero_compute_exactly_the_pretrained_model():
    backbone, spec = _cnn()
    split = split_model(backbone, spec, TrainableSpec(kind="conv-adapter"), 3)
    x = torch.from_numpy(_data((1, 32, 32), n=8)[0])
    with torch.no_grad():
        assert torch.equal(split.tail(split.trunk(x)), split.tail.output(backbone(x)))
        # Train mode changes nothing frozen: the tail is a deterministic function.
        assert torch.equal(
            set_train_mode(split.tail)(split.trunk(x)), split.tail.eval()(split.trunk(x))
        )


def test_lora_at_round_zero_computes_the_pretrained_model():
    backbone, spec = _tiny_vit()
    lora = split_model(backbone, spec, TrainableSpec(kind="lora", lora_rank=4), 3)
    plain = split_model(backbone, spec, TrainableSpec(kind="last-block"), 3)  # same split, head
    x = torch.from_numpy(_data((3, 32, 32), n=8)[0])
    with torch.no_grad():
        acts = lora.trunk(x)
        # LoRA adds exactly zero to the (converted) pretrained layers...
        assert torch.equal(lora.tail(acts), plain.tail(acts))
        # ...and the converted attention computes what torch's MultiheadAttention computes.
        torch.testing.assert_close(lora.tail(acts), lora.tail.output(backbone(x)))


def test_frozen_dropout_stays_off_while_the_tail_trains():
    backbone, spec = _tiny_vit(dropout=0.5)
    split = split_model(backbone, spec, TrainableSpec(kind="lora", lora_rank=4), 3)
    acts = torch.from_numpy(_activations(split, _data((3, 32, 32), n=8)[0]))
    with torch.no_grad():
        evaluated = split.tail.eval()(acts)
        set_train_mode(split.tail)
        assert split.tail.training and split.tail.block1.training  # LoRA inside: train mode
        assert torch.equal(split.tail(acts), evaluated)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, padding=1, stride=2),
        dict(kernel_size=3, padding=0, stride=2),
        dict(kernel_size=5, padding=4, dilation=2),
        dict(kernel_size=2, stride=2),
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=3, padding=1, groups=8),  # depthwise
    ],
)
def test_conv_adapter_matches_its_conv_shape_and_starts_at_zero(conv):
    base = nn.Conv2d(8, 8, **conv).requires_grad_(False)
    adapter = ConvAdapter(base, 4, torch.Generator().manual_seed(0))
    x = torch.randn(2, 8, 11, 11)
    with torch.no_grad():
        assert torch.equal(adapter(x), base(x))
        adapter.up.weight.normal_()
        assert adapter(x).shape == base(x).shape
        assert not torch.equal(adapter(x), base(x))
    assert adapter.down.groups == adapter.up.groups == base.groups


@pytest.mark.parametrize(("padding", "centres"), [(1, [0, 2, 4]), (0, [1, 3])])
def test_conv_adapter_reads_the_centre_of_each_receptive_field(padding, centres):
    base = nn.Conv2d(1, 1, 3, stride=2, padding=padding)
    adapter = ConvAdapter(base, 1, torch.Generator())
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    with torch.no_grad():
        adapter.down.weight.fill_(1.0)
        adapter.up.weight.fill_(1.0)
        branch = adapter(x) - base(x)
    want = x[..., centres, :][..., centres]
    torch.testing.assert_close(branch, want)


# --- BatchNorm never sees an institution's batch -----------------------------------------


def test_batchnorm_in_a_last_block_tail_becomes_a_frozen_affine_map():
    backbone, spec = _cnn()
    bn_state = {
        k: v.clone()
        for k, v in backbone.state_dict().items()
        if "running" in k or "num_batches" in k
    }
    split = split_model(backbone, spec, TrainableSpec(kind="last-block"), 3)
    x, y = _data((1, 32, 32))
    xt = torch.from_numpy(x)

    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in split.tail.modules())
    assert sum(type(m).__name__ == "FrozenBatchNorm" for m in split.tail.modules()) >= 2
    with torch.no_grad():
        assert torch.equal(split.tail(split.trunk(xt)), split.tail.output(backbone(xt)))
    frozen_buffers = _snapshot(split.tail)

    train_tail(split.tail, _activations(split, x), y, DP)

    for k, v in backbone.state_dict().items():
        if k in bn_state:
            assert torch.equal(v, bn_state[k]), f"{k} changed"
    after = split.tail.state_dict()
    for k, v in frozen_buffers.items():
        if "running" in k:
            assert torch.equal(after[k], v)


# --- one-line errors for bad input ------------------------------------------------------


def test_lora_target_that_does_not_exist_is_named_with_the_layers_that_do():
    backbone, spec = _tiny_vit()
    with pytest.raises(FerryError, match=r"'block9\.\*'.*block1\.mlp\.0.*--lora-targets"):
        split_model(backbone, spec, TrainableSpec(kind="lora", lora_targets=("block9.*",)), 3)
    with pytest.raises(FerryError, match=r"not Linear: block1\.mlp \(MLPBlock\)"):
        split_model(backbone, spec, TrainableSpec(kind="lora", lora_targets=("block1.mlp",)), 3)
    cnn, cnn_spec = _cnn()
    with pytest.raises(FerryError, match="no default LoRA targets.*conv-adapter or head"):
        split_model(cnn, cnn_spec, TrainableSpec(kind="lora"), 3)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (dict(lora_rank=0), "LoRA rank must be >= 1, got 0"),
        (dict(lora_alpha=0.0), "LoRA alpha must be > 0"),
        (dict(adapter_dim=0), "adapter bottleneck must be >= 1"),
        (dict(kind="everything"), "unknown trainable part 'everything'"),
    ],
)
def test_bad_trainable_spec_is_refused_in_one_line(bad, message):
    with pytest.raises(FerryError, match=message) as err:
        TrainableSpec(**bad).validate()
    assert "\n" not in str(err.value)
    backbone, spec = _cnn()
    with pytest.raises(FerryError, match=message):
        split_model(backbone, spec, TrainableSpec(**bad), 3)


def test_last_block_on_a_backbone_without_one_suggests_head():
    backbone, spec = _cnn()
    no_stage = dataclasses.replace(spec, name="flat-net", last_stage="")
    for kind in ("last-block", "conv-adapter"):
        with pytest.raises(FerryError, match="flat-net has no last block.*--trainable head"):
            split_model(backbone, no_stage, TrainableSpec(kind=kind), 3)
    vit, vit_spec = _tiny_vit()
    with pytest.raises(FerryError, match="no Conv2d.*--trainable lora"):
        split_model(vit, vit_spec, TrainableSpec(kind="conv-adapter"), 3)


def test_trainable_arrays_of_the_wrong_shape_or_names_are_refused():
    backbone, spec = _cnn()
    tail = split_model(backbone, spec, TrainableSpec(kind="conv-adapter"), 3).tail
    good = trainable_state(tail)

    wrong_shape = {**good, "output.weight": np.zeros((4, 64), np.float32)}
    with pytest.raises(
        FerryError, match=r"wrong shape: output\.weight \(4, 64\) \(want \(3, 64\)\)"
    ):
        load_trainable_state(tail, wrong_shape)
    missing = {k: v for k, v in good.items() if k != "12.up.weight"}
    with pytest.raises(FerryError, match=r"missing 12\.up\.weight"):
        load_trainable_state(tail, missing)
    with pytest.raises(FerryError, match=r"unexpected 9\.weight"):
        load_trainable_state(tail, {**good, "9.weight": np.zeros(3, np.float32)})
    np.testing.assert_array_equal(trainable_state(tail)["output.weight"], good["output.weight"])


# --- the trainer: clipping modes, regression, memory maps -------------------------------


@pytest.mark.parametrize("model", ["cnn-conv-adapter", "vit-lora"])
def test_ghost_clipping_trains_and_accounts_the_same_mechanism_as_flat(model, same_draws):
    backbone, spec = _cnn() if model.startswith("cnn") else _tiny_vit()
    part = TrainableSpec(kind=model.split("-", 1)[1], lora_rank=4)
    x, y = _data(spec.input_shape, n=20)
    outcomes, held = {}, {}
    for clipping in ("flat", "ghost"):
        split = split_model(backbone, spec, part, 3)
        acts = _activations(split, x)
        cfg = dataclasses.replace(DP, clipping=clipping, max_grad_norm=0.1)

        def train(split=split, acts=acts, cfg=cfg, clipping=clipping):
            outcomes[clipping] = train_tail(split.tail, acts, y, cfg)

        steps = _per_example_state_at_each_step(split.tail, train)
        held[clipping] = set().union(*(attrs for step in steps for attrs in step.values()))

    flat, ghost = outcomes["flat"], outcomes["ghost"]
    assert held == {"flat": {"grad_sample"}, "ghost": {"_norm_sample"}}  # ghost really ran
    assert ghost.segment == flat.segment and flat.segment.steps == 3
    # Same draws of sampling and noise, same clipped sum: the same update.
    for k, v in flat.trainable_state.items():
        np.testing.assert_allclose(ghost.trainable_state[k], v, rtol=1e-4, atol=1e-5)
    with pytest.raises(FerryError, match="--clipping flat or --clipping ghost"):
        DPTrainConfig(noise_multiplier=1.0, clipping="fast").validate()


@pytest.mark.parametrize("clipping", ["flat", "ghost"])
def test_physical_batches_split_a_logical_batch_without_changing_the_update(clipping, same_draws):
    backbone, spec = _cnn()
    x, y = _data((1, 32, 32))
    outcomes = []
    for physical in (0, 3):
        split = split_model(backbone, spec, TrainableSpec(kind="conv-adapter"), 3)
        cfg = dataclasses.replace(DP, clipping=clipping, max_physical_batch=physical)
        outcomes.append(train_tail(split.tail, _activations(split, x), y, cfg))

    whole, split_up = outcomes
    assert split_up.segment == whole.segment
    for k, v in whole.trainable_state.items():
        np.testing.assert_allclose(split_up.trainable_state[k], v, rtol=1e-4, atol=1e-5)


def test_regression_tail_trains_on_mse_and_reports_rmse():
    backbone, spec = _cnn()
    split = split_model(backbone, spec, TrainableSpec(kind="conv-adapter"), 1)
    x, _ = _data((1, 32, 32))
    targets = np.random.default_rng(3).normal(size=len(x)).astype(np.float32)

    outcome = train_tail(split.tail, _activations(split, x), targets, DP, task="regression")

    assert outcome.segment is not None and math.isnan(outcome.accuracy)
    assert math.isfinite(outcome.rmse) and outcome.rmse > 0 and math.isfinite(outcome.loss)
    three = split_model(backbone, spec, TrainableSpec(kind="head"), 3)
    with pytest.raises(FerryError, match="one value per example"):
        train_tail(three.tail, _activations(three, x), targets, DP, task="regression")


def test_memory_mapped_activations_train_exactly_like_an_array(tmp_path, same_draws):
    backbone, spec = _cnn()
    x, y = _data((1, 32, 32))
    results = []
    for mapped in (False, True):
        split = split_model(backbone, spec, TrainableSpec(kind="last-block"), 3)
        acts = _activations(split, x)
        if mapped:
            np.save(tmp_path / "acts.npy", acts)
            acts = np.load(tmp_path / "acts.npy", mmap_mode="r")
            assert isinstance(acts, np.memmap)
        outcome = train_tail(split.tail, acts, y, DP)
        results.append((outcome, predict_tail(split.tail, acts, batch=5)))

    (array_run, array_out), (mapped_run, mapped_out) = results
    for k, v in array_run.trainable_state.items():
        np.testing.assert_array_equal(mapped_run.trainable_state[k], v)
    np.testing.assert_array_equal(mapped_out, array_out)
    assert mapped_out.shape == (len(x), 3)
    assert mapped_run.head_state is mapped_run.trainable_state  # the old name still works


def test_lora_layer_is_frozen_base_plus_scaled_low_rank_update():
    base = nn.Linear(6, 5)
    lora = LoRALinear(base, rank=2, alpha=8.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(lora(x), base(x))
        lora.lora_B.weight.normal_()
        want = base(x) + 4.0 * x @ lora.lora_A.weight.T @ lora.lora_B.weight.T
        torch.testing.assert_close(lora(x), want)
    assert not base.weight.requires_grad and lora.lora_A.weight.requires_grad
