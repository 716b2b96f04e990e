import pytest

from realign.gates import GATE_SPECS, PRESETS, Thresholds, parse_overrides, verdict_status


def test_presets_cover_every_gate_and_match_metrics_md():
    for preset in PRESETS.values():
        assert set(preset) == set(GATE_SPECS)
    assert PRESETS["standard"]["preference_gap"] == 0.15
    assert PRESETS["standard"]["min_pairs"] == 1000
    assert PRESETS["standard"]["decontamination"] == 0.9
    assert PRESETS["standard"]["reward_accuracy"] == 0.70
    assert PRESETS["standard"]["kl_divergence"] == 0.1
    assert PRESETS["standard"]["capability_retention"] == 0.95
    assert PRESETS["strict"]["min_pairs"] == 5000
    assert PRESETS["relaxed"]["length_bias"] == 0.80


def test_evaluate_ops_and_unmeasured():
    t = Thresholds()
    assert t.evaluate("kl_divergence", 0.1).status == "pass"  # <=
    assert t.evaluate("kl_divergence", 0.1001).status == "fail"
    assert t.evaluate("reward_margin", 0.0).status == "fail"  # strict >
    assert t.evaluate("min_pairs", 999).status == "fail"
    g = t.evaluate("preference_gap", None, detail="no scores")
    assert g.status == "unmeasured" and g.value is None


def test_override_is_recorded():
    t = Thresholds(preset="strict", overrides=parse_overrides(["min_pairs=10"]))
    g = t.evaluate("min_pairs", 12)
    assert g.status == "pass" and g.overridden and g.threshold == 10
    assert g.preset_threshold == 5000
    assert not t.evaluate("decontamination", 0.99).overridden


@pytest.mark.parametrize("bad", ["nope=1", "min_pairs", "min_pairs=abc"])
def test_bad_overrides(bad):
    with pytest.raises(ValueError):
        parse_overrides([bad])


def test_verdict_status_order():
    t = Thresholds()
    ok, bad, unk = (t.evaluate("kl_divergence", 0.01), t.evaluate("kl_divergence", 1.0),
                    t.evaluate("kl_divergence", None))
    assert verdict_status([ok]) == "pass"
    assert verdict_status([ok, unk]) == "incomplete"
    assert verdict_status([ok, unk, bad]) == "fail"
