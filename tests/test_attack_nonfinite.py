"""The operator as adversary: a head (or trunk) that makes one record's per-example gradient
non-finite must not turn the release into a finiteness oracle. Each record contributes its
clipped gradient or exactly zero, so the released arrays are always finite and equal, for a
fixed generator, to the round where that record's gradient is zero."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ferry.client import dp_randomness
from ferry.client.dp_trainer import DPTrainConfig, train_tail
from ferry.common.heads import build_head

N, D, BAD = 200, 8, 17


@pytest.fixture
def fixed_generator(monkeypatch):
    """Test harness only: every round draws from the same seed, so two rounds differ only by
    their data."""
    monkeypatch.setattr(
        dp_randomness,
        "round_generator",
        lambda device="cpu": torch.Generator(device).manual_seed(0),
    )


def _features() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)


def _release(head: torch.nn.Module, x, y, task: str, **cfg) -> dict[str, np.ndarray]:
    config = DPTrainConfig(noise_multiplier=2.0, max_grad_norm=1.0, batch_size=2 * N, lr=0.1, **cfg)
    return train_tail(head, x, y, config, task).trainable_state


def _overflowing_linear_head() -> torch.nn.Module:
    """Finite arrays whose class-1 logit overflows only where feature 3 is huge."""
    head = build_head("linear", D, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[1, 3] = 1e10
    return head


def _all_finite(arrays: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in arrays.values())


def test_linear_release_is_finite_when_one_record_overflows_its_logits():
    x, y = _features(), np.arange(N) % 2
    x[BAD, 3] = 1e30  # logit 1e40: inf in float32, a NaN per-example gradient
    assert _all_finite(_release(_overflowing_linear_head(), x, y, "classification"))


def test_linear_release_with_an_overflowing_record_equals_its_zero_gradient_twin(
    fixed_generator,
):
    x, y = _features(), np.arange(N) % 2
    y[BAD] = 0
    bad, twin = x.copy(), x.copy()
    bad[BAD, 3] = 1e30  # NaN gradient
    twin[BAD, 3] = -1e20  # softmax exactly one-hot on label 0: gradient exactly 0
    released = _release(_overflowing_linear_head(), bad, y, "classification")
    reference = _release(_overflowing_linear_head(), twin, y, "classification")
    assert _all_finite(reference)
    for k in reference:
        np.testing.assert_array_equal(released[k], reference[k])


MODES = [("flat", 0), ("flat", 64), ("ghost", 0), ("ghost", 64)]


@pytest.mark.parametrize("clipping, physical", MODES)
@pytest.mark.parametrize("poison", ["inf-feature", "overflowing-hidden-layer"])
def test_opacus_release_is_finite_when_one_record_is_non_finite(clipping, physical, poison):
    torch.manual_seed(0)
    x, y = _features(), np.arange(N) % 2
    head = build_head("mlp", D, 2)
    if poison == "inf-feature":
        x[BAD, 3] = np.inf
    else:
        with torch.no_grad():  # finite arrays; the hidden layer overflows for this record only
            next(head.parameters()).mul_(1e30)
        x[BAD, :] = 1e10
    released = _release(
        head, x, y, "classification", clipping=clipping, max_physical_batch=physical
    )
    assert _all_finite(released)


@pytest.mark.parametrize("clipping, physical", MODES)
def test_opacus_release_with_a_non_finite_record_equals_its_zero_gradient_twin(
    fixed_generator, clipping, physical
):
    torch.manual_seed(0)
    head = build_head("mlp", D, 1)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    x = _features()
    with torch.no_grad():
        y = head(torch.from_numpy(x))[:, 0].numpy().copy()  # every residual 0 at the start
    y[:BAD] += 1.0  # the others have gradients; the twin row keeps residual exactly 0
    y[BAD + 1 :] -= 1.0
    bad = x.copy()
    bad[BAD, 3] = np.inf
    mode = {"clipping": clipping, "max_physical_batch": physical}
    released = _release(head, bad, y, "regression", **mode)
    head.load_state_dict(state)
    reference = _release(head, x, y, "regression", **mode)
    assert _all_finite(reference)
    for k in reference:
        if clipping == "flat":
            np.testing.assert_array_equal(released[k], reference[k])
        else:  # ghost drops the row: a 199-row batch rounds apart by ~1e-8, noise std is 1e-3
            np.testing.assert_allclose(released[k], reference[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "head_name, clipping", [("linear", "flat"), ("mlp", "flat"), ("mlp", "ghost")]
)
def test_returned_loss_is_finite_when_one_record_is_non_finite(head_name, clipping):
    x, y = _features(), np.arange(N) % 2
    x[BAD, 3] = np.inf
    config = DPTrainConfig(noise_multiplier=2.0, batch_size=2 * N, lr=0.1, clipping=clipping)
    outcome = train_tail(build_head(head_name, D, 2), x, y, config, "classification")
    assert np.isfinite(outcome.loss)
