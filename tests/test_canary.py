"""The canary's routing, labels, report and switches (:mod:`nat_ray.serve.canary`), without Serve; the
served routes run in ``tests/integration/test_serve.py``."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nat_ray.config import NatRayConfig, load_config
from nat_ray.errors import ConfigError
from nat_ray.serve.api import CanaryRequest
from nat_ray.serve.canary import Canary, CanaryState, verdict


def test_the_share_of_unnamed_requests_goes_to_the_canary():
    state = CanaryState("m", Canary("m:new", 0.25), seed=0)
    routed = [state.route() for _ in range(4000)]
    assert 0.22 < routed.count("m:new") / len(routed) < 0.28
    assert set(routed) == {"m", "m:new"}
    assert {CanaryState("m").route() for _ in range(100)} == {"m"}  # no canary: all to the incumbent


def test_the_report_counts_labels_from_gold_and_feedback_and_gives_a_verdict():
    state = CanaryState("m", Canary("m:new", 0.5), seed=0)
    for i in range(40):
        state.answered(f"old-{i}", "m", i < 8)  # 8 / 40 right
        state.answered(f"new-{i}", "m:new", None)  # no gold: unlabelled until feedback
    assert state.report()["verdict"] == "too few labels"
    for i in range(40):
        state.feedback(f"new-{i}", 1.0 if i < 36 else 0.4)  # a person: 36 / 40 right
    state.feedback("never-answered", 1.0)  # unknown ids change nothing
    report = state.report()
    new, old = report["models"]["m:new"], report["models"]["m"]
    assert (new["episodes"], new["labelled"], new["successes"]) == (40, 40, 36)
    assert (old["labelled"], old["successes"], old["rate"]) == (40, 8, 0.2)
    assert old["interval"][0] < 0.2 < old["interval"][1] < new["interval"][0]
    assert report["verdict"] == "better" and (report["canary"], report["share"]) == ("m:new", 0.5)


def test_verdicts_follow_the_intervals():
    def stats(lo, hi):
        return {"labelled": 10, "interval": [lo, hi]}

    assert verdict(stats(0.1, 0.3), stats(0.5, 0.7)) == "worse"
    assert verdict(stats(0.4, 0.6), stats(0.5, 0.7)) == "within noise"
    assert verdict(stats(0.8, 0.9), stats(0.5, 0.7)) == "better"


def test_promote_and_rollback_switch_and_refuse_without_a_canary():
    state = CanaryState("m", Canary("m:new", 0.1))
    assert state.promote() == "m:new" and state.canary is None
    assert {state.route() for _ in range(50)} == {"m:new"}
    with pytest.raises(LookupError, match="no canary is running"):
        state.promote()
    state.answered("e1", "m:new", True)
    state.start(Canary("m:newer", 0.1))  # a new trial counts from its start
    assert state.report()["models"] == {}
    assert state.rollback() == "m:new" and state.report()["verdict"] is None
    with pytest.raises(LookupError):
        state.rollback()


def test_canary_settings_are_checked_at_load_and_on_the_route():
    cfg = load_config(
        NatRayConfig, None, ["serve.lora_dir=/adapters", "serve.canary={adapter: round-2, share: 0.2}"]
    )
    assert (cfg.serve.canary.adapter, cfg.serve.canary.share) == ("round-2", 0.2)
    for bad, words in (
        (["serve.lora_dir=/a", "serve.canary={adapter: r, share: 1}"], "share must be in (0, 1)"),
        (["serve.canary={adapter: r}"], "needs serve.lora_dir"),
        (["serve.lora_dir=/a", "serve.canary={adapter: r, shar: 0.1}"], "serve.canary.shar: unknown key"),
    ):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            load_config(NatRayConfig, None, bad)
    for body in (
        '{"adapter": "r", "share": 0}',
        '{"adapter": "r", "share": 1.0}',
        '{"adapter": "", "share": 0.1}',
    ):
        with pytest.raises(ValidationError):
            CanaryRequest.model_validate_json(body)
