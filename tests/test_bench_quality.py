"""bench.quality --quick runs the full comparison's code path end to end (its numbers are not checked)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from bench import quality

pytestmark = pytest.mark.slow


def test_quick_mode_runs_every_stage_and_reports_targets_with_cis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "BENCH.md"
    docs.write_text(f"# before\n{quality.DOC_BEGIN}\nold numbers\n{quality.DOC_END}\n# after\n", encoding="utf-8")
    from mlflow.tracking import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)  # artifacts beside the store, not in the current directory's ./mlruns
    client.create_experiment("fedsense-bench-quality", artifact_location=(tmp_path / "artifacts").as_uri())
    assert "MLFLOW_EXPERIMENT_NAME" not in os.environ
    targets = quality.main(["--quick", "--out", str(tmp_path), "--docs", str(docs), "--tracking-uri", tracking])
    # The benchmark's experiment name reached its simulations but does not outlive the call: later runs in this
    # process log to their own experiment (test_tracking failed in CI when it leaked).
    assert "MLFLOW_EXPERIMENT_NAME" not in os.environ
    out = capsys.readouterr().out
    for row in (
        "zero-filled",
        "CS L1-wavelet (tuned)",
        "U-Net local",
        "U-Net centralized (pooled)",
        "U-Net FedAvg",
        "U-Net FedAvg + fine-tune",
    ):
        assert f"| {row} |" in out
    assert "site-d" in out  # the low-data scenario's fourth site
    assert "unseen acquisition (site-x: 1 T, 20 coils" in out and "gaussian2d mask" in out
    assert "should this site join?" in out and "| converged |" in out
    # CS was tuned over the 7-value log grid 1e-4 ... 1e-1.
    assert "lambda in 0.0001, 0.00032, 0.001, 0.0032, 0.01, 0.032, 0.1" in out
    # Every learned method stopped at or before the budget and was selected on a validation round.
    runs = tmp_path / "R4" / "runs"
    for name in ("unet-centralized-s0", "unet-fedavg-s0"):
        assert (runs / name / "best.json").is_file()
    # The personalised row's models are the sites' own fine-tuned files, never a shared checkpoint.
    for site in ("site-a", "site-b", "site-c", "site-d"):
        assert (runs / "unet-fedavg-s0" / "site-state" / site / "finetuned.pt").is_file()
    assert (tmp_path / "quality-curves.png").stat().st_size > 10_000
    comparisons = [row[1] for row in targets]
    assert sum("local at site-" in c for c in comparisons) == 4
    assert any("unseen anatomy" in c for c in comparisons)
    assert any("wall time of" in c for c in comparisons)
    for row in targets:
        if row[3].startswith(("+", "-")) and "[" in row[3]:
            mean, low, high = (float(x.strip("[],")) for x in row[3].split())
            assert low <= mean <= high and all(math.isfinite(v) for v in (mean, low, high))
    # The docs section between the markers is the run's own output; the rest of the file is untouched.
    text = docs.read_text(encoding="utf-8")
    assert text.startswith("# before\n") and text.endswith("# after\n") and "old numbers" not in text
    assert "### Targets" in text and "| U-Net FedAvg + fine-tune |" in text
    # --tracking-uri: each learned arm (baseline and Flower simulation) is an MLflow run, with its global
    # validation PSNR per round as the run directory holds it.
    from server.store import GLOBAL_SITE, RunDir

    experiment = client.get_experiment_by_name("fedsense-bench-quality")
    tracked = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert {"unet-local-s0", "unet-centralized-s0", "unet-fedavg-s0"} <= set(tracked)
    for name in ("unet-centralized-s0", "unet-fedavg-s0"):
        records = RunDir(runs / name).read_metrics(dedupe=True)
        expected = {
            r["round"]: r["metrics"]["psnr"] for r in records if r["site"] == GLOBAL_SITE and r["phase"] == "evaluate"
        }
        history = client.get_metric_history(tracked[name].info.run_id, "global/evaluate/psnr")
        assert {m.step: m.value for m in history} == pytest.approx(expected), name
    assert (tmp_path / "artifacts").is_dir()
    _fine_tune_to_convergence_reads_the_run(tmp_path, capsys)


def _fine_tune_to_convergence_reads_the_run(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench.fine_tune_convergence on the quick run: fine-tunes its federated model at every site again,
    compares with the run's own fine-tuned files, and gives each site a verdict against its local model."""
    from bench import fine_tune_convergence

    docs = out / "FT.md"
    begin, end = quality.doc_markers("quick", tool="bench.fine_tune_convergence")
    docs.write_text(f"top\n{begin}\nold\n{end}\n", encoding="utf-8")
    argv = [str(out / "R4"), "--model", "U-Net", "--arms", "fedavg", "--seeds", "0", "--steps", "4"]
    rows = fine_tune_convergence.main(
        [*argv, "--eval-every", "2", "--patience", "1", "--warmup", "2", "--docs", str(docs), "--section", "quick"]
    )
    text = capsys.readouterr().out
    assert [row[0] for row in rows] == ["site-a", "site-b", "site-c", "site-d"]
    verdicts = {"join", "no benefit", "harmful", "too few subjects"}
    for site, chosen, _val, test, local, gain, verdict, tuned, control, against in rows:
        assert chosen in {"fedavg", f"fedavg {fine_tune_convergence.FINE_TUNED}"}
        assert gain.low <= gain.mean <= gain.high and gain.seeds == 1 and gain.subjects >= 1
        assert gain.mean == pytest.approx(test - local, abs=1e-6)
        assert control.mean == pytest.approx(test - tuned, abs=1e-6)
        assert verdict in verdicts and against in verdicts
        # Every site's federated model and (the control) its own local model were fine-tuned again.
        assert f"| fedavg | 0 | {site} |" in text and f"| local | 0 | {site} | - |" in text
    assert "bench.quality's fine-tune (dB)" in text
    written = docs.read_text(encoding="utf-8")
    assert "\nold\n" not in written and "| site | best personalised (on validation) |" in written
    with pytest.raises(SystemExit):
        fine_tune_convergence.main([*argv, "--patience", "0"])
    with pytest.raises(SystemExit):  # refused before an hour of fine-tuning, not after it
        fine_tune_convergence.main([*argv, "--docs", str(docs), "--section", "absent"])
    assert "markers" in capsys.readouterr().err
