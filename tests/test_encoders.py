"""Encoders for tables, fingerprints and price windows (tabular-mlp, molecule-mlp,
series-cnn, series-gru): shapes, artifacts, trainable parts, and that pretraining helps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from ferry.common.backbones import build_backbone
from ferry.common.backbones.registry import backbone_spec
from ferry.common.errors import FerryError
from ferry.common.serialization import instantiate, make_artifact
from ferry.common.trainable import TrainableSpec, split_model

ENCODERS = {
    # name: (modality, preprocessing, last_stage)
    "tabular-mlp": ("tabular", {"kind": "tabular", "standardize": "public"}, "block1"),
    "molecule-mlp": ("molecule", {"kind": "molecule"}, "block1"),
    "series-cnn": ("series", {"kind": "series", "standardize": "public"}, "conv2"),
    "series-gru": ("series", {"kind": "series", "standardize": "public"}, "out"),
}
SHAPES = [
    ("tabular-mlp", (5,)),
    ("tabular-mlp", (37,)),
    ("molecule-mlp", (2048,)),
    ("molecule-mlp", (64,)),
    ("series-cnn", (1, 30)),
    ("series-cnn", (3, 7)),
    ("series-cnn", (2, 1)),
    ("series-gru", (1, 30)),
    ("series-gru", (4, 12)),
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(name: str, shape: tuple[int, ...], n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if name == "molecule-mlp":
        return (torch.rand(n, *shape, generator=gen) < 0.1).float()
    return torch.randn(n, *shape, generator=gen)


def _used(name: str, shape: tuple[int, ...]) -> nn.Module:
    """A trunk whose weights and BatchNorm statistics are not the builder's defaults."""
    torch.manual_seed(1)
    trunk = build_backbone(name, shape)
    with torch.no_grad():
        for p in trunk.parameters():
            p.add_(0.05 * torch.randn_like(p))
        trunk.train()(_inputs(name, shape, 16, seed=1))  # moves the running statistics
    return trunk.eval()


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoders_are_registered_with_modality_preprocessing_and_real_stage_names(name):
    modality, preprocessing, last_stage = ENCODERS[name]
    spec = backbone_spec(name)
    assert (spec.modality, spec.preprocessing, spec.last_stage) == (
        modality,
        preprocessing,
        last_stage,
    )
    assert spec.feature_dim == 64
    trunk = build_backbone(name)
    assert isinstance(trunk, nn.Sequential)
    assert last_stage in dict(trunk.named_children())
    modules = dict(trunk.named_modules())
    assert spec.lora_targets and all(isinstance(modules[t], nn.Linear) for t in spec.lora_targets)
    # The output standardisation is the last module: frozen statistics, no affine parameters.
    norm = list(trunk.modules())[-1]
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine


@pytest.mark.parametrize("name,shape", SHAPES)
def test_encoders_give_finite_64_features_for_any_width_and_channel_count(name, shape):
    trunk = build_backbone(name, shape).eval()
    with torch.no_grad():
        features = trunk(_inputs(name, shape, 3))
    assert features.shape == (3, 64)
    assert torch.isfinite(features).all()
    with torch.no_grad():  # eval mode: one example's features do not depend on its batch
        alone = trunk(_inputs(name, shape, 3)[:1])
    torch.testing.assert_close(alone, features[:1])


@pytest.mark.parametrize("name,shape", [SHAPES[1], SHAPES[3], SHAPES[5], SHAPES[8]])
def test_artifact_round_trip_gives_identical_features(name, shape):
    trunk = _used(name, shape)
    spec = backbone_spec(name)
    manifest = {
        "architecture": name,
        "feature_dim": 64,
        "input_shape": list(shape),
        "preprocessing": spec.preprocessing,
    }
    loaded = instantiate(make_artifact(manifest, trunk))
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x = _inputs(name, shape, 8, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(x), trunk(x))
        fresh = build_backbone(name, shape).eval()
        assert not torch.allclose(fresh(x), trunk(x))  # the equality above is the weights'


@pytest.mark.parametrize("name,shape", [SHAPES[0], SHAPES[3], SHAPES[5], SHAPES[8]])
@pytest.mark.parametrize("kind", ["last-block", "lora"])
def test_trainable_tails_start_from_the_pretrained_model(name, shape, kind):
    x = _inputs(name, shape, 6, seed=3)
    whole = split_model(_used(name, shape), backbone_spec(name), TrainableSpec("head"), 3)
    split = split_model(_used(name, shape), backbone_spec(name), TrainableSpec(kind), 3)
    assert split.split in dict(_used(name, shape).named_children())
    assert any(p.requires_grad for p in split.tail.parameters())
    with torch.no_grad():
        torch.testing.assert_close(split.tail(split.trunk(x)), whole.tail(whole.trunk(x)))


def test_conv_adapter_is_refused_on_series_cnn_with_a_fix():
    with pytest.raises(FerryError, match="--trainable lora or --trainable head"):
        split_model(
            build_backbone("series-cnn", (1, 30)),
            backbone_spec("series-cnn"),
            TrainableSpec("conv-adapter"),
            2,
        )


@pytest.mark.parametrize(
    "name,shape",
    [
        ("tabular-mlp", (4, 4)),
        ("molecule-mlp", (0,)),
        ("series-cnn", (30,)),
        ("series-gru", (0, 9)),
    ],
)
def test_builders_refuse_shapes_that_do_not_fit_with_a_fix(name, shape):
    with pytest.raises(FerryError, match=f"{name} takes .*ferry pretrain --data"):
        build_backbone(name, shape)


def _table(seed: int, n: int, d: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian rows; two nonlinear concepts: sign(x0 * x1) and |x2| > 0.8."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x, x[:, 0] * x[:, 1] > 0, np.abs(x[:, 2]) > 0.8


def _linear_probe(trunk: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        features = trunk.eval()(torch.from_numpy(x)).numpy()
    half = len(y) // 2
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return probe.fit(features[:half], y[:half]).score(features[half:], y[half:])


def test_pretrained_tabular_mlp_features_beat_random_init_on_a_related_task():
    # Source: 4 classes = both concepts. Target (another sample): concept a and not b, which
    # no linear model of the raw columns can express.
    x, a, b = _table(0, 1500)
    xs, ys = torch.from_numpy(x), torch.from_numpy((2 * a + b).astype(np.int64))
    torch.manual_seed(0)
    trunk = build_backbone("tabular-mlp", (12,))
    model = nn.Sequential(trunk, nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        order = torch.randperm(len(xs), generator=gen)
        for i in range(0, len(order), 128):
            idx = order[i : i + 128]
            loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    xt, at, bt = _table(1, 2000)
    yt = (at & ~bt).astype(np.int64)
    torch.manual_seed(100)
    random_init = build_backbone("tabular-mlp", (12,))
    pretrained, baseline = _linear_probe(trunk, xt, yt), _linear_probe(random_init, xt, yt)
    assert pretrained > 0.82
    assert pretrained > baseline + 0.1
