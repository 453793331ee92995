"""The real-transfer benchmark and the per-part federated benchmark run end to end at tiny
sizes and report what their runs measured (figures are not asserted: those live in
BENCHMARKS.md; only facts that hold at any size are)."""

from __future__ import annotations

import pytest
from PIL import Image

from ferry.simulations.bench import trainable_bench, transfer_bench
from ferry.simulations.bench.report import replace_section


def test_digits_folder_holds_each_digit_as_an_8x8_gray_png_per_class(tmp_path):
    root = transfer_bench.write_digits_folder(tmp_path / "digits", limit=60)
    assert sorted(p.name for p in root.iterdir()) == [str(d) for d in range(10)]
    files = sorted(root.rglob("*.png"))
    assert len(files) == 60
    with Image.open(files[0]) as img:
        assert img.mode == "L" and img.size == (8, 8)
        assert max(img.getdata()) > 128  # ink is bright: the 0..16 scale reaches 255


def test_digits_folder_without_limit_writes_all_1797_digits(tmp_path):
    root = transfer_bench.write_digits_folder(tmp_path / "digits")
    assert sum(1 for _ in root.rglob("*.png")) == 1797


@pytest.mark.slow
def test_transfer_bench_runs_pretrained_and_random_lite0_on_the_same_split(tmp_path, without_ray):
    # The bench runs on Ray (`python -m ferry.simulations.bench.transfer_bench`); here its
    # federations run in this process: what is checked is its rows and table, not Ray.
    sizes = transfer_bench.TransferSizes(
        input_size=32, images=150, clients=2, rounds=2, probe_images=8, non_private_reference=False
    )
    results = transfer_bench.run(sizes, tmp_path / "work", log=lambda *_: None)
    rows = {r["run"]: r for r in results["rows"]}
    assert set(rows) == {"pretrained", "random"}  # the non-private reference is left out
    pre, rnd = rows["pretrained"], rows["random"]
    assert (pre["pretraining"], rnd["pretraining"]) == ("imagenet", "random-init")
    for row in (pre, rnd):
        assert 0 < row["max_epsilon"] <= sizes.epsilon * 1.001
        # Cold caches: each run ships its backbone once to every institution.
        assert row["backbone_sent_total"] == sizes.clients * row["backbone_bytes"]
    assert pre["train_examples"] == rnd["train_examples"]  # same split, same seeds
    # A linear head on 1,280 features for 10 digits, in float32: what travels each message.
    assert all(r["head_bytes"] == (1280 * 10 + 10) * 4 for r in rows.values())
    assert pre["bytes_per_round_per_client"] >= 3 * pre["head_bytes"]  # sent twice, back once
    assert rnd["mean_feature_std"] < pre["mean_feature_std"]
    table = transfer_bench.render(results, "cmd")
    assert table.count("\n| ") == 3  # header and two runs
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Ferry benchmarks\n\n## Other\n\nkept\n")
    replace_section(markdown, transfer_bench.HEADING, table)
    text = markdown.read_text()
    assert "kept" in text and transfer_bench.HEADING in text and "**" in text


@pytest.mark.slow
def test_federated_part_row_pairs_a_dp_run_with_step_times_on_the_same_tail(tmp_path, without_ray):
    sizes = trainable_bench.FederatedSizes(
        rounds=2,
        cnn_clients=2,
        cnn_examples=300,
        pretrain_examples=400,
        pretrain_epochs=1,
        step_examples=128,
        cnn_steps=(4, 1),
        client_rounds=(1, 1),
    )
    (row,) = trainable_bench.federated_rows(
        sizes, tmp_path / "work", parts=(("conv-adapter", "ferry-cnn"),), log=lambda *_: None
    )
    assert row["part"] == "conv-adapter" and row["pretraining"] == "synthetic-hospital-imaging"
    assert 0 <= row["accuracy"] <= 1
    assert 0 < row["max_epsilon"] <= sizes.epsilon * 1.001
    # What the run shipped per message is exactly the tail the step bench trained.
    assert row["trained_bytes"] == row["params_trained"] * 4 == row["bytes_per_round"]
    assert row["dp_step_ms"] > 0 and row["nonprivate_step_ms"] > 0
    assert row["client_dp_round_s"] > 0 and row["client_nonprivate_round_s"] > 0
    text = trainable_bench.render_federated([row], "cmd", 1.0)
    assert "conv-adapter" in text and f"{row['dp_ratio']:.2f}×" in text
