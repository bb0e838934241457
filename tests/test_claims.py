"""Bounded claims: ``num-examples`` above a site's registered cap is clipped before FedAvg weighs it."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import ConfigError
from common.runconfig import RunConfig
from server.claims import apply_caps
from server.strategy import build_strategy, site_of, validate_updates
from test_strategy import _task_identity, global_record, reply, shifted  # noqa: F401  (fixture)

CAP = 10


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_a_site_claiming_ten_times_its_cap_weighs_only_its_cap(strategy: str) -> None:
    run = RunConfig(
        strategy=strategy, min_train_nodes=1, min_available_nodes=1, site_caps='{"a": 10, "b": 10, "liar": 10}'
    )
    replies = [
        reply(1, "a", shifted(1.0), n=CAP),
        reply(2, "b", shifted(1.0), n=CAP),
        reply(3, "liar", shifted(100.0), n=10 * CAP),
    ]
    valid, rejected = validate_updates(replies, global_record())
    kept, uncapped, clipped = apply_caps(valid, run.caps)
    assert rejected == uncapped == [] and len(kept) == 3
    assert [(c.site, c.claimed, c.cap) for c in clipped] == [("liar", 100.0, CAP)]
    assert "clipped to 10" in clipped[0].reason
    arrays, _ = build_strategy(run).aggregate_train(1, kept)
    # Independent: the weighted mean with the liar at its cap, by hand.
    capped = (CAP * 1.0 + CAP * 1.0 + CAP * 100.0) / (3 * CAP)
    np.testing.assert_allclose(arrays["w"].numpy(), capped, rtol=1e-6)
    # What the lie would have bought without the cap: the aggregate dragged almost all the way.
    uncapped_mean = (CAP * 1.0 + CAP * 1.0 + 10 * CAP * 100.0) / (12 * CAP)
    assert uncapped_mean > 80 > capped


def test_a_site_without_a_cap_is_rejected_once_caps_are_set() -> None:
    replies = [reply(1, "a", shifted(1.0), n=5), reply(2, "stranger", shifted(1.0), n=5)]
    kept, rejected, clipped = apply_caps(replies, {"a": 10})
    assert [site_of(m) for m in kept] == ["a"] and clipped == []
    assert [(r.site, "no num-examples cap" in r.reason) for r in rejected] == [("stranger", True)]


def test_without_caps_every_claim_passes_unchanged() -> None:
    replies = [reply(1, "a", shifted(1.0), n=500)]
    kept, rejected, clipped = apply_caps(replies, {})
    assert kept == replies and rejected == clipped == []
    assert next(iter(kept[0].content.metric_records.values()))["num-examples"] == 500


@pytest.mark.parametrize("value", ['{"a": 0}', '{"a": 1.5}', '["a"]', "{nope", '{"a": true}'])
def test_bad_site_caps_fail_at_start_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match="site-caps"):
        RunConfig.from_flat({"site-caps": value})


def test_the_serverapp_clips_a_lying_site_and_records_it(small_sites: list, tmp_path) -> None:
    """End to end with the real ServerApp and ClientApps (test_reliability_updates' loopback grid): site-c
    claims ten times its cap; the checkpoint is the aggregate with site-c weighted at its cap."""
    import copy
    import json

    from test_reliability_updates import arrays_of, checkpoint, forged, run_serverapp, train_summary, weighted_mean

    lies: list = []

    def liar(request, reply):
        # Its own direction (every weight +0.1), so that how much it weighs shows in the aggregate.
        lie = forged(request, reply, {k: v + np.float32(0.1) for k, v in arrays_of(reply).items()})
        lie.content["metrics"]["num-examples"] = 10 * CAP
        lies.append(copy.deepcopy(lie))
        return lie

    caps = {"site-a": 10**6, "site-b": 10**6, "site-c": CAP}
    grid, store = run_serverapp(small_sites, tmp_path / "run", {(1, "site-c"): liar}, **{"site-caps": json.dumps(caps)})
    summary = train_summary(store, 1)
    assert summary["sites"] == ["site-a", "site-b", "site-c"] and summary["rejected"] == []
    [clipped] = summary["clipped"]
    assert (clipped["site"], clipped["claimed"], clipped["cap"]) == ("site-c", 10.0 * CAP, CAP)
    # Independent: FedAvg with site-c's claim cut to its cap, by hand; and the lie, had it been believed.
    believed = weighted_mean([*grid.received[1].values(), lies[0]])
    lies[0].content["metrics"]["num-examples"] = CAP
    expected, got = weighted_mean([*grid.received[1].values(), lies[0]]), checkpoint(store, 1)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert max(float(np.abs(believed[k] - expected[k]).max()) for k in expected) > 1e-2
    site_c = next(r for r in store.read_metrics() if r["round"] == 1 and r["site"] == "site-c")
    assert site_c["num_examples"] == CAP
