"""The site-side subcommands of ``fedsense``: ``evaluate``, ``reconstruct`` and ``client`` (the SuperNode).

They run at a hospital on its own files and need only ``common`` and this package. ``server/cli.py``
hands these subcommands over by name (the module's string, as Flower loads ``client.app:app``), so the
server package never imports the client package and a site never needs the server's code paths.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from common.command import (
    CommandParser,
    add_delegated,
    nonnegative_int,
    positive_float,
    positive_int,
    run_command,
)
from common.errors import FedSenseError

if TYPE_CHECKING:  # torch is imported by the commands that need it, not by --help
    import torch


def _add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the network runs (auto: CUDA when present)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "auto"),
        default="auto",
        help="bf16 autocasts the network only; FFTs, data consistency and metrics stay fp32; "
        "auto: bf16 where measured faster on this machine",
    )


def _devices(args: argparse.Namespace) -> tuple[torch.device, str]:
    from common.device import resolve_device

    # "auto" stays "auto": the model is timed on the first slice (common.precision.choose_precision).
    return resolve_device(args.device, "--device"), args.precision


def _stops_children(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``command`` so that Ctrl-C or SIGTERM leaves none of its child processes (loaders, file checks) behind."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from common.proctree import ProcessTree

        with ProcessTree():
            return command(args)

    return run


@_stops_children
def cmd_evaluate(args: argparse.Namespace) -> int:
    from client.evaluate import evaluate_sites, parse_baselines, render, rows
    from common.artifact import load_artifact
    from common.preflight import check_sites

    check_sites(args.sites)  # every config problem at once (a site given twice too), before the model loads
    device, precision = _devices(args)
    loaded = load_artifact(args.model, device=device)
    scores = evaluate_sites(
        loaded.model,
        args.sites,
        split=args.split,
        baselines=parse_baselines(args.baselines),
        batch_size=args.batch_size,
        device=device,
        precision=precision,
        max_slices=args.max_slices,
        console=Console(stderr=True),
    )
    render(
        rows(scores),
        args.format,
        sys.stdout,
        title=f"{loaded.card.id} · {args.split} split · {device.type} {precision}",
    )
    return 0


@_stops_children
def cmd_reconstruct(args: argparse.Namespace) -> int:
    from client.dicom import PatientIdPolicy
    from client.reconstruct import MaskSettings, Reconstructor, check_outputs, reconstruct_files
    from common.artifact import load_artifact
    from common.config import load_site_config

    check_outputs(args.inputs, Path(args.out), args.format, args.overwrite)  # seconds, before the model loads
    patient_ids = PatientIdPolicy.from_options(args.patient_id, args.pseudonym_salt_file)
    device, precision = _devices(args)
    loaded = load_artifact(args.model, device=device)
    mask = None
    given = (args.mask, args.acceleration, args.center_fraction)
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise FedSenseError("--mask, --acceleration and --center-fraction go together")
        mask = MaskSettings(args.mask, args.acceleration, args.center_fraction, args.seed)
    site = load_site_config(args.site_config) if args.site_config else None
    reconstructor = Reconstructor(
        loaded, device=device, precision=precision, site=site, mask=mask, allow_untrained_mask=args.allow_untrained_mask
    )
    for path in reconstruct_files(
        reconstructor,
        args.inputs,
        Path(args.out),
        args.format,
        Console(stderr=True),
        overwrite=args.overwrite,
        patient_ids=patient_ids,
    ):
        print(path)
    return 0


def add_commands(sub: argparse._SubParsersAction[CommandParser]) -> None:
    """Register ``evaluate``, ``reconstruct`` and ``client`` on a ``fedsense`` subparser set."""
    p = sub.add_parser("evaluate", help="score an exported model and baselines on this site's own data")
    p.add_argument("--model", required=True, type=Path, help="exported model folder (fedsense export)")
    p.add_argument("--sites", nargs="+", required=True, type=Path, help="site config TOML files")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--baselines", default="zero-filled", help="comma-separated: zero-filled, cs (default: zero-filled)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument(
        "--max-slices",
        type=nonnegative_int,
        default=0,
        help="stop each site and method after this many slices (0: all)",
    )
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    _add_device_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("reconstruct", help="reconstruct fastMRI h5 or NIfTI scans with an exported model")
    p.add_argument("--model", required=True, type=Path, help="exported model folder (fedsense export)")
    p.add_argument("inputs", nargs="+", type=Path, help="fastMRI .h5 or NIfTI .nii/.nii.gz files")
    p.add_argument("--out", required=True, help="output folder (one file or DICOM series per input)")
    p.add_argument(
        "--format",
        choices=("h5", "nifti", "dicom"),
        help="h5 (fastMRI submission), nifti (NIfTI inputs) or dicom; default: like the input",
    )
    p.add_argument("--site-config", type=Path, help="site TOML whose scanner re-acquires NIfTI inputs")
    p.add_argument("--mask", help="undersampling of fully sampled k-space (default: the model's training mask)")
    p.add_argument("--acceleration", type=positive_float, help="with --mask: the undersampling factor R")
    p.add_argument("--center-fraction", type=positive_float, help="with --mask: fraction of central lines kept")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="mask seed (per file and slice, as in training)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs an earlier run wrote in --out")
    p.add_argument(
        "--allow-untrained-mask",
        action="store_true",
        help="reconstruct even when the mask is not one the model was trained for",
    )
    p.add_argument("--patient-id", help="DICOM PatientID to write (default: a random pseudonym per input)")
    p.add_argument(
        "--pseudonym-salt-file",
        type=Path,
        help="secret file (>= 16 bytes): DICOM PatientID = salted hash of the input's identity, the same in every run",
    )
    _add_device_options(p)
    p.set_defaults(func=cmd_reconstruct)

    from client import supernode

    add_delegated(
        sub,
        "client",
        supernode.build_parser(),
        supernode.run,
        help="run this institution's site against a remote SuperLink (TLS + node authentication)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="fedsense", description="FedSense site-side commands.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
