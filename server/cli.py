"""``fedsense``: the one command line of FedSense. Thin: each subcommand calls into a package."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from common.errors import FedSenseError

if TYPE_CHECKING:
    from common.runconfig import RunConfig

logger = logging.getLogger("fedsense")


def _parse_set(pairs: Sequence[str]) -> dict[str, Any]:
    """``--set key=value`` overrides of run-config keys; values are parsed as JSON when they can be."""
    import json

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FedSenseError(f"--set: expected key=value, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _run_config(args: argparse.Namespace, defaults: dict[str, Any]) -> "RunConfig":
    """Defaults from pyproject's [tool.flwr.app.config], then command-line options, then --set."""
    from common.runconfig import RunConfig

    flat = dict(defaults)
    flat["sites"] = ",".join(str(p) for p in args.sites)
    for option, key in (("rounds", "num-server-rounds"), ("strategy", "strategy"), ("mu", "proximal-mu"),
                        ("model", "model"), ("run_dir", "run-dir"), ("local_steps", "local-steps"),
                        ("name", "name"), ("seed", "seed")):
        value = getattr(args, option, None)
        if value is not None:
            flat[key] = value
    flat.update(_parse_set(args.set or []))
    n = len(args.sites)
    for key in ("min-train-nodes", "min-evaluate-nodes", "min-available-nodes"):
        flat[key] = min(int(flat.get(key, n)), n)
    return RunConfig.from_flat(flat, source="fedsense")


def _app_defaults() -> dict[str, Any]:
    import tomllib

    from server.simulate import find_project_dir

    with open(find_project_dir() / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sites", nargs="+", type=Path, required=True, help="site config TOML files, one per site")
    p.add_argument("--rounds", type=int, help="number of federated rounds")
    p.add_argument("--model", choices=("unet", "unrolled", "varnet"))
    p.add_argument("--local-steps", type=int, help="optimisation steps per site and round (0: use local-epochs)")
    p.add_argument("--run-dir", help="where metrics and checkpoints go (default: runs/<name>)")
    p.add_argument("--name", help="run name shown in tables and plots")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any run-config key")


def cmd_simulate(args: argparse.Namespace) -> int:
    from server.simulate import simulate
    from server.viewer.table import show

    run = _run_config(args, _app_defaults())
    if args.run_dir is None:
        run = run.model_copy(update={"run_dir": f"runs/{run.name}"})
    store = simulate(run, timeout=args.timeout, report=lambda line: print(line, flush=True))
    show(store.path, fmt="table", out=sys.stdout)
    print(f"metrics: {store.metrics_path}\ncheckpoints: {store.checkpoint_dir}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from server.baseline import Baseline
    from server.viewer.table import show

    run = _run_config(args, _app_defaults())
    if args.run_dir is None:
        run = run.model_copy(update={"run_dir": f"runs/{args.kind}"})
    if args.name is None:
        run = run.model_copy(update={"name": args.kind})
    store = Baseline(args.kind, run).execute()
    show(store.path, fmt="table", out=sys.stdout)
    return 0


def cmd_data_demo(args: argparse.Namespace) -> int:
    from common.config import load_site_config
    from common.data.demo import generate_demo

    sites = [load_site_config(p) for p in args.site_config] or None
    written = generate_demo(Path(args.out), size=args.size, subjects=args.subjects, seed=args.seed, sites=sites)
    for name, info in written.items():
        print(f"{name}: {info.get('folder', '')}")
    return 0


def cmd_metrics_show(args: argparse.Namespace) -> int:
    from server.viewer.table import show

    show(Path(args.run_dir), fmt=args.format, out=sys.stdout)
    return 0


def cmd_metrics_plot(args: argparse.Namespace) -> int:
    from server.viewer.plots import plot

    for path in plot([Path(p) for p in args.run_dirs], Path(args.out)):
        print(path)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from server.viewer.dashboard import serve

    serve(Path(args.run_dir), host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsense", description="Federated compressed-sensing MRI reconstruction on Flower.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run a federation of simulated sites to completion")
    _add_run_options(p)
    p.add_argument("--strategy", choices=("fedavg", "fedprox", "fedmedian", "fedtrimmedavg"))
    p.add_argument("--mu", type=float, help="FedProx proximal weight")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="give up after this many seconds")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("baseline", help="local-only, centralized or zero-filled baseline on the same sites")
    p.add_argument("kind", choices=("local", "centralized", "centralized-balanced", "zero-filled"))
    _add_run_options(p)
    p.set_defaults(func=cmd_baseline)

    data = sub.add_parser("data", help="site data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("demo", help="write offline demo data (real file formats, MNI anatomy)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--subjects", type=int, help="subjects per site (default: each site config's demo.subjects)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--site-config", action="append", default=[], help="generate only these sites' data")
    p.set_defaults(func=cmd_data_demo)

    metrics = sub.add_parser("metrics", help="view a run's per-round metrics").add_subparsers(dest="metrics_command", required=True)
    p = metrics.add_parser("show", help="table of rounds x sites")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=cmd_metrics_show)
    p = metrics.add_parser("plot", help="PNG curves and sample reconstructions")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_metrics_plot)

    p = sub.add_parser("dashboard", help="live web dashboard of a run")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8050)
    p.set_defaults(func=cmd_dashboard)

    from server import pki, supernode

    p = sub.add_parser("pki", parents=[pki.build_parser()], add_help=False,
                       help="CA, SuperLink certificate and per-site SuperNode keys (idempotent; --rotate SITE)")
    p.set_defaults(func=pki.run)
    p = sub.add_parser("client", parents=[supernode.build_parser()], add_help=False,
                       help="run this institution's site against a remote SuperLink (TLS + node authentication)")
    p.set_defaults(func=supernode.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except FedSenseError as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
