"""``fedsense``: the one command line of FedSense. Thin: each subcommand calls into a package."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.command import (
    EXIT_SITE_FAILED,
    CommandParser,
    add_delegated,
    nonnegative_float,
    nonnegative_int,
    port_number,
    positive_float,
    positive_int,
    run_command,
)
from common.errors import FedSenseError
from common.registry import BASELINES, MODELS, STRATEGIES

if TYPE_CHECKING:
    from common.runconfig import RunConfig
    from server.store import RunDir

logger = logging.getLogger(__name__)


# Site-side subcommands live in client/cli.py; they are handed over by module name (as Flower loads
# "client.app:app") so the server package never imports the client package.
SITE_CLI = "client.cli"
SITE_COMMANDS = {
    "evaluate": "score an exported model and baselines on this site's own data (site side)",
    "reconstruct": "reconstruct fastMRI h5 or NIfTI scans with an exported model (site side)",
    "client": "run this institution's site against a remote SuperLink (TLS + node authentication; site side)",
}


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


def _run_config(
    args: argparse.Namespace, defaults: dict[str, Any], derive: Callable[[Mapping[str, Any]], Mapping[str, Any]]
) -> RunConfig:
    """The run config through :func:`common.config_layers.resolve`: pyproject < derived < --run-file <
    command-line options < --set; ``derive`` gives the values that follow from the others (the run dir)."""
    from common import config_layers as layers

    options = {
        key: getattr(args, option) for option, key in layers.OPTION_KEYS if getattr(args, option, None) is not None
    }
    sources = {
        layers.PYPROJECT: defaults,
        layers.RUN_FILE: layers.read_run_file(Path(args.run_file)) if args.run_file else {},
        layers.COMMAND_LINE: {**options, "sites": ",".join(str(p) for p in args.sites)},
        layers.SET: _parse_set(args.set or []),
    }
    return layers.resolve(sources, site_count=len(args.sites), derive=derive).run


def _claim_run_dir(run: RunConfig, resume: bool, overwrite: bool, continuable: bool = False) -> bool:
    """Before any data is read: the run directory is no site config or data folder, nor holds or lies in one,
    and an earlier run there is continued (``resume``) or replaced only with ``--overwrite`` (``continuable``: a
    refusal may suggest ``resume=true``). Returns whether an earlier run is to be replaced: the caller removes
    it (``RunDir.remove_earlier_run``) only after the sites passed their checks."""
    from common.config import load_site_config
    from common.outputs import check_not_input
    from server.store import RunDir

    inputs = [Path(site) for site in run.site_list]
    for site in run.site_list:
        try:
            inputs.append(load_site_config(site).data_path)
        except FedSenseError:
            pass  # the site checks that follow name what is wrong with it
    check_not_input(Path(run.run_dir), inputs, "--run-dir")
    return RunDir(run.run_dir).check_fresh(resume, overwrite, continuable)


def _app_defaults() -> dict[str, Any]:
    from common.config_layers import pyproject_values
    from server.simulate import find_project_dir

    return pyproject_values(find_project_dir())


def _show_run_defaults(p: argparse.ArgumentParser) -> None:
    """Name, in ``--help``, the default each run option takes from pyproject's run config (its own is None)."""
    from common.config_layers import OPTION_KEYS

    try:
        defaults = _app_defaults()
    except (OSError, FedSenseError) as exc:  # help must still work; the run itself will say what is missing
        logger.debug("run-config defaults unavailable for --help: %s", exc)
        return
    for action in p._actions:
        key = dict(OPTION_KEYS).get(action.dest)
        if key in defaults and action.default is None and "default" not in (action.help or ""):
            shown = (str(defaults[key]) or "''").replace("%", "%%")
            action.help = f"{action.help or ''} (default: {shown}, run-config key {key})".lstrip()


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sites", nargs="+", type=Path, required=True, help="site config TOML files, one per site")
    p.add_argument("--rounds", type=positive_int, help="number of federated rounds")
    p.add_argument("--model", choices=MODELS)
    p.add_argument(
        "--local-steps", type=nonnegative_int, help="optimisation steps per site and round (0: use local-epochs)"
    )
    p.add_argument("--run-dir", help="where metrics and checkpoints go (default: runs/<name>)")
    p.add_argument("--name", help="run name shown in tables and plots")
    p.add_argument("--seed", type=nonnegative_int)
    p.add_argument("--tracking", help="server-side experiment trackers: mlflow, tensorboard or both, comma-separated")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else SQLite in the run directory)"
    )
    p.add_argument("--run-file", help="TOML file of run-config keys (over pyproject's, under options and --set)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any run-config key")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in the run directory (its own files only) instead of refusing",
    )


def _site_places(run: RunConfig) -> dict[str, list[Path]]:
    """Each site's name -> its data folder and config (absolute), to name the site of an error message."""
    from common.config import load_site_config

    places = {}
    for site in run.site_list:
        config = load_site_config(site)
        places[config.name] = [config.data_path, config.data_path.resolve(), Path(site).resolve()]
    return places


def _add_data_check_option(p: argparse.ArgumentParser) -> None:
    """The override of :func:`_check_sites_ready`, the same for every command that starts a run."""
    p.add_argument(
        "--skip-data-check",
        action="store_true",
        help="start even if a site fails the `fedsense data check` readiness test run first",
    )


def _check_sites_ready(run: RunConfig, skip_data_check: bool, report: Callable[[str], None]) -> None:
    """Every site config, then (unless skipped) every site's data, before the run directory is created: a site
    that cannot train or be evaluated is refused now, not after a failed run was left behind."""
    from common.preflight import check_sites
    from server.readiness import check_readiness

    check_sites(run.site_list)  # every config problem at once, before any data is read
    if not skip_data_check:
        check_readiness(run.site_list, report)


def cmd_simulate(args: argparse.Namespace) -> int:
    from server.simulate import SimResources, simulate
    from server.site_errors import (
        finished_without,
        missed_phases,
        reporting_site_errors,
    )
    from server.store import RunDir

    run = _run_config(args, _app_defaults(), derive=lambda flat: {"run-dir": f"runs/{flat['name']}"})
    # resume = true (the default) continues a federated run that did not finish, or a finished one asked for more
    # rounds; any other run or a baseline there is refused as `fedsense baseline` refuses one, before any data
    # is read (--overwrite replaces it).
    continuable = not args.overwrite and _continues(RunDir(run.run_dir), baseline=None, rounds=run.num_server_rounds)
    replace = _claim_run_dir(run, run.resume and continuable, args.overwrite, continuable)
    report = lambda line: print(line, flush=True)  # noqa: E731
    _check_sites_ready(run, args.skip_data_check, report)
    if replace:
        RunDir(run.run_dir).remove_earlier_run()
    resources = SimResources(ray_address=args.ray_address, client_cpus=args.client_cpus, client_gpus=args.client_gpus)
    places = _site_places(run)
    with reporting_site_errors(Path(run.run_dir) / "flower.log", places, report) as site_errors:
        try:
            store = simulate(run, timeout=args.timeout, report=report, resources=resources)
        except FedSenseError as exc:  # with what the sites said, on screen, not only in flower.log
            raise FedSenseError("\n".join([str(exc), *site_errors])) from exc
    from server.viewer.table import show  # after the run: a bad config is refused without loading the viewers

    records = store.read_metrics(dedupe=True)
    problem = finished_without(records, list(places), site_errors)
    if problem:  # recorded before the table, which shows the status
        store.mark_finished_without(missed_phases(records, list(places)))
    show(store.path, fmt="table", out=sys.stdout)
    print(f"metrics: {store.metrics_path}\ncheckpoints: {store.checkpoint_dir}")
    if problem:
        print(f"fedsense: error: {problem}", file=sys.stderr, flush=True)
        return EXIT_SITE_FAILED
    return 0


def _continues(store: RunDir, baseline: str | None, rounds: int | None = None) -> bool:
    """Whether the same command continues the run in ``store`` (else it needs ``--overwrite``).

    ``baseline``: a baseline of that kind continues only after a signal stopped it; ``None`` (``simulate``): a
    federated run continues unless it finished (a failed or crashed one resumes from its last checkpoint); a
    finished one continues only to train more ``rounds`` than it ran (re-running it as it was would only print
    the old results).
    """
    if not store.config_path.is_file():
        return False
    config = store.read_config()
    if config.get("baseline") != baseline:
        return False  # a run of another kind: resuming it would mix two runs
    if baseline is None:
        if config.get("status") in ("finished", "finished-without-sites"):
            return rounds is not None and rounds > int(config.get("num-server-rounds", 0))
        return True
    return config.get("status") == "interrupted"


def cmd_baseline(args: argparse.Namespace) -> int:
    from server.baseline import Baseline
    from server.progress import reporting_rounds
    from server.store import RunDir
    from server.viewer.table import show

    run = _run_config(args, _app_defaults(), derive=lambda flat: {"run-dir": f"runs/{args.kind}", "name": args.kind})
    # The same command after Ctrl-C continues the interrupted baseline; a finished one needs --overwrite.
    resume = not args.overwrite and _continues(RunDir(run.run_dir), args.kind)
    replace = _claim_run_dir(run, resume=resume, overwrite=args.overwrite)
    _check_sites_ready(run, args.skip_data_check, lambda line: print(line, flush=True))
    if replace:
        RunDir(run.run_dir).remove_earlier_run()
    baseline = Baseline(args.kind, run)
    print(
        f"{args.kind} baseline: {len(run.site_list)} sites x {run.num_server_rounds} rounds; run directory {run.run_dir}"
        + ("; resuming the interrupted run" if resume else ""),
        flush=True,
    )
    with reporting_rounds(RunDir(run.run_dir), run.num_server_rounds, lambda line: print(line, flush=True)):
        try:
            store = baseline.execute(resume=resume)
        except KeyboardInterrupt:
            stopped = RunDir(run.run_dir)
            detail = stopped.read_config().get("status_detail", {}) if stopped.config_path.is_file() else {}
            last = detail.get("last_complete_round")
            if last is not None:  # as simulate says it: where the same command picks up
                print(
                    f"interrupted; {run.run_dir} resumes after round {last} when the same command is run again",
                    flush=True,
                )
            raise
    show(store.path, fmt="table", out=sys.stdout)
    return 0


def cmd_data_demo(args: argparse.Namespace) -> int:
    from common.config import load_site_config
    from common.data.demo import generate_demo
    from common.outputs import check_not_input

    sites = [load_site_config(p) for p in args.site_config] or None
    for site in sites or ():
        check_not_input(Path(args.out) / site.name, [Path(p) for p in args.site_config])
    written = generate_demo(
        Path(args.out), size=args.size, subjects=args.subjects, seed=args.seed, sites=sites, overwrite=args.overwrite
    )
    for name, info in written.items():
        print(f"{name}: {info.get('folder', '')}" + (f" (site config {info['config']})" if "config" in info else ""))
    return 0


class _PartitionableKinds:
    """``data partition --dataset``'s choices: the registered dataset kinds with a partitioner, read from
    :mod:`common.data.kinds` when argparse first asks (the kinds import h5py and nibabel, which building the
    parser for every other command does not need)."""

    @staticmethod
    def _names() -> tuple[str, ...]:
        from common.data.partition import partitionable_kinds

        return partitionable_kinds()

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())


def cmd_data_partition(args: argparse.Namespace) -> int:
    from common.data.partition import PartitionSpec, partition_dataset
    from server.viewer.partition import print_partition_summary

    spec = PartitionSpec(
        dataset=args.dataset,
        root=Path(args.root),
        by=args.by,
        out=Path(args.out),
        sites=args.sites,
        alpha=args.alpha,
        label=args.label,
        partition_csv=Path(args.partition_csv) if args.partition_csv else None,
        max_subjects=args.max_subjects,
        contrasts=tuple(args.contrasts or ()),
        seed=args.seed,
        profile=args.profile,
        link="copy" if args.copy else args.link,
        max_slices_per_volume=args.max_slices,
        overwrite=args.overwrite,
    )
    result = partition_dataset(spec)
    print_partition_summary(result.summary, sys.stdout)
    print(f"site configs: {' '.join(str(p) for p in result.site_tomls)}\nsummary: {result.out / 'partition.json'}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    # Site-side code, reached by module name as the ClientApp is ("client.app:app"): server never imports
    # client statically, so the coordinator's packages stay free of site code and the check runs in-process.
    import importlib

    return int(importlib.import_module("client.check").run(Path(args.site_config), args.manifest))


def cmd_metrics_show(args: argparse.Namespace) -> int:
    from server.viewer.table import show

    show(Path(args.run_dir), fmt=args.format, out=sys.stdout)
    return 0


def cmd_metrics_plot(args: argparse.Namespace) -> int:
    from server.viewer.plots import plot

    for path in plot([Path(p) for p in args.run_dirs], Path(args.out), overwrite=args.overwrite):
        print(path)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from server.viewer.dashboard import serve

    serve(
        Path(args.run_dir),
        host=args.host,
        port=args.port,
        token_file=args.token_file,
        wait=args.wait,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from server.export import export_run

    card = export_run(
        Path(args.run_dir),
        Path(args.out),
        which=args.round,
        onnx=args.onnx,
        site_configs=[Path(p) for p in args.site_config],
        overwrite=args.overwrite,
    )
    print(f"{card.id}: round {card.round} of {card.run_name} -> {args.out}")
    if card.onnx is not None:
        print(f"onnx: {card.onnx.file} (max |error| vs PyTorch {card.onnx.max_abs_error:.2e})")
    return 0


def cmd_verdict(args: argparse.Namespace) -> int:
    from server.verdict import table, verdicts

    rows = verdicts(
        Path(args.run_dir),
        Path(args.local),
        args.site,
        args.split,
        site_state_dir=Path(args.site_state_dir) if args.site_state_dir else None,
    )
    print(table(rows, args.split))
    return 0


def cmd_site(args: argparse.Namespace) -> int:
    verbose = ["-v"] if args.verbose else []
    debug = ["--debug"] if args.debug else []
    return int(importlib.import_module(SITE_CLI).main([*verbose, *debug, args.command, *args.rest]))


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="fedsense", description="Federated compressed-sensing MRI reconstruction on Flower.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run a federation of simulated sites to completion")
    _add_run_options(p)
    p.add_argument("--strategy", choices=STRATEGIES)
    p.add_argument("--mu", type=nonnegative_float, help="FedProx proximal weight")
    p.add_argument("--timeout", type=positive_float, default=6 * 3600, help="give up after this many seconds")
    p.add_argument("--ray-address", help="run the simulated sites on this existing Ray cluster (HOST:PORT of its head)")
    p.add_argument("--client-cpus", type=positive_int, help="CPUs per simulated site (Flower's default: 2)")
    p.add_argument("--client-gpus", type=nonnegative_float, help="GPUs (or fractions) per simulated site (default: 0)")
    _add_data_check_option(p)
    _show_run_defaults(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("baseline", help=f"a baseline on the same sites: {', '.join(BASELINES)}")
    p.add_argument("kind", choices=BASELINES)
    _add_run_options(p)
    _add_data_check_option(p)
    _show_run_defaults(p)
    p.set_defaults(func=cmd_baseline)

    data = sub.add_parser("data", help="site data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("demo", help="write offline demo data (real file formats, MNI anatomy)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=positive_int, default=128, help="in-plane matrix of the written data (>= 16)")
    p.add_argument(
        "--subjects", type=positive_int, help="subjects per site (default: each site config's demo.subjects)"
    )
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--site-config", action="append", default=[], help="generate only these sites' data")
    p.add_argument("--overwrite", action="store_true", help="replace earlier demo site folders in --out")
    p.set_defaults(func=cmd_data_demo)

    p = data.add_parser("partition", help="simulated hospitals from fastMRI / BraTS / IXI: site folders + TOMLs")
    p.add_argument("--dataset", required=True, choices=_PartitionableKinds())
    p.add_argument("--root", required=True, help="the downloaded dataset's folder")
    p.add_argument(
        "--by",
        required=True,
        help="ixi: hospital; brats: institution; fastmri: scanner | field-strength | contrast; any: random | dirichlet",
    )
    p.add_argument("--out", required=True, help="folder for <site>/ (links to the files) and <site>.toml")
    p.add_argument("--sites", type=positive_int, help="number of sites (random, dirichlet)")
    p.add_argument("--alpha", type=positive_float, help="Dirichlet concentration (dirichlet; small = more non-IID)")
    p.add_argument("--label", help="what the Dirichlet split skews (a natural key or 'none'; default per dataset)")
    p.add_argument("--partition-csv", help="FeTS partition CSV (Subject_ID,Partition_ID) for --by institution")
    p.add_argument("--max-subjects", type=positive_int, help="at most this many subjects per site (seeded choice)")
    p.add_argument("--contrasts", nargs="+", help="only these contrasts (e.g. T2 PD, flair, AXT2)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument(
        "--profile",
        default="3t-16ch",
        help="scanner profile for settings the data does not record: "
        "3t-16ch | 1.5t-8ch | 3t-4ch | a site TOML whose [scanner] to use",
    )
    p.add_argument(
        "--link",
        choices=("auto", "hard", "symlink"),
        default="auto",
        help="how site folders refer to the files (auto: hard link, symlink across filesystems)",
    )
    p.add_argument("--copy", action="store_true", help="copy the files instead of linking them")
    p.add_argument("--max-slices", type=positive_int, help="max_slices_per_volume of the written site configs")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier partition in --out (only the files it wrote; edited ones are refused)",
    )
    p.set_defaults(func=cmd_data_partition)
    p = data.add_parser("check", help="(site side) can this site's data train? counts, masks, bad files, manifest")
    p.add_argument("site_config", help="the site's TOML")
    p.add_argument("--manifest", type=Path, help="where to write the dataset manifest (default: SITE.manifest.json)")
    p.set_defaults(func=cmd_data_check)

    metrics = sub.add_parser("metrics", help="view a run's per-round metrics").add_subparsers(
        dest="metrics_command", required=True
    )
    p = metrics.add_parser("show", help="table of rounds x sites")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=cmd_metrics_show)
    p = metrics.add_parser("plot", help="PNG curves and sample reconstructions")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing its figures")
    p.set_defaults(func=cmd_metrics_plot)

    p = sub.add_parser("dashboard", help="live web dashboard of a run")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8050)
    p.add_argument(
        "--token-file",
        type=Path,
        help="require the token in this file (created, and printed once, at first start); needed beyond 127.0.0.1",
    )
    p.add_argument("--wait", action="store_true", help="wait for a run directory that does not exist yet")
    p.add_argument(
        "--metrics-port",
        type=port_number,
        default=0,
        help="also serve the run's Prometheus gauges alone, without the token, on this port (default 0: off)",
    )
    p.add_argument("--metrics-host", default="127.0.0.1", help="interface of --metrics-port (default 127.0.0.1)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("export", help="export a run's model (safetensors + model card, optional ONNX)")
    p.add_argument("run_dir")
    p.add_argument("--round", default="best", help="best (the run's best.json), last, or a round number")
    p.add_argument("--out", required=True, help="new folder for the artifact")
    p.add_argument("--onnx", action="store_true", help="also export the network as ONNX, checked against PyTorch")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier exported model in --out")
    p.add_argument(
        "--site-config",
        action="append",
        default=[],
        help="site TOML(s) whose acquisition goes into the card (default: the run's own sites)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "verdict", help="should each site join? its best federated model vs its local baseline, with a CI"
    )
    p.add_argument("run_dir", help="a finished federated run (or a pooled centralized baseline run)")
    p.add_argument("--local", required=True, help="the local baseline run of the same sites (fedsense baseline local)")
    p.add_argument("--site", action="append", default=[], help="only this site (repeatable; default: every site)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which split of each site to score")
    p.add_argument(
        "--site-state-dir", help="where the sites' fine-tuned models are (default: the run's site-state-dir)"
    )
    p.set_defaults(func=cmd_verdict)

    for name, text in SITE_COMMANDS.items():
        p = sub.add_parser(name, help=text, add_help=False, prefix_chars="\x00")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=cmd_site)

    from server import operator, pki

    add_delegated(
        sub,
        "pki",
        pki.build_parser(),
        pki.run,
        help="CA, SuperLink certificate and per-site SuperNode keys (idempotent; --rotate SITE)",
    )
    add_delegated(
        sub,
        "operator",
        operator.build_parser(),
        operator.run,
        help="run a flwr command through the front door with an operator client certificate",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
