"""The promotion gate as a pure function: better, worse, equal, no champion, incomparable, lower-is-better."""

from __future__ import annotations

import pytest

from birefnet.registry import gate, primary_score

SETS = ("DIS-TE1", "DIS-TE2")


def scores(sm: float, mae: float = 0.05, sets: tuple[str, ...] = SETS) -> dict[str, dict[str, float]]:
    return {s: {"Sm": sm, "MAE": mae} for s in sets}


def test_no_champion_becomes_first() -> None:
    d = gate(scores(0.5), None, None, "Sm", 0.001, SETS)
    assert d.promote and d.decision == "first" and d.champion_score is None
    assert "first model" in d.reason


@pytest.mark.parametrize(("challenger", "champion", "min_delta", "decision"), [
    (0.80, 0.70, 0.001, "promoted"),    # better
    (0.60, 0.70, 0.001, "rejected"),    # worse
    (0.70, 0.70, 0.0, "rejected"),      # equal: the incumbent stays, even with min_delta 0
    (0.7005, 0.70, 0.001, "rejected"),  # better, but by less than min_delta
    (0.701, 0.70, 0.001, "promoted"),   # exactly min_delta
])
def test_higher_is_better(challenger: float, champion: float, min_delta: float, decision: str) -> None:
    d = gate(scores(challenger), scores(champion), "3", "Sm", min_delta, SETS)
    assert d.decision == decision
    assert d.promote is (decision == "promoted")
    assert d.challenger_score == pytest.approx(challenger) and d.champion_score == pytest.approx(champion)
    assert f"{challenger:.4f}" in d.reason and "v3" in d.reason


def test_lower_is_better_for_mae() -> None:
    assert gate(scores(0.5, mae=0.04), scores(0.9, mae=0.05), "1", "MAE", 0.001, SETS).promote
    d = gate(scores(0.9, mae=0.06), scores(0.5, mae=0.05), "1", "MAE", 0.001, SETS)
    assert not d.promote and d.decision == "rejected" and "lower is better" in d.reason


def test_champion_on_other_sets_is_incomparable() -> None:
    d = gate(scores(0.9), scores(0.1, sets=("DIS-TE1",)), "2", "Sm", 0.0, SETS)
    assert not d.promote and d.decision == "incomparable" and "DIS-TE2" in d.reason


def test_primary_score_is_the_mean_over_sets() -> None:
    metrics = {"A": {"Sm": 0.2}, "B": {"Sm": 0.6}, "C": {"Sm": 1.0}}
    assert primary_score(metrics, "Sm", ["A", "B"]) == pytest.approx(0.4)
    with pytest.raises(KeyError, match="'D'"):
        primary_score(metrics, "Sm", ["A", "D"])


def test_tags_are_strings() -> None:
    tags = gate(scores(0.8), scores(0.7), "1", "Sm", 0.001, SETS).to_tags()
    assert tags["birefnet.gate.decision"] == "promoted" and tags["birefnet.gate.sets"] == "DIS-TE1,DIS-TE2"
    assert all(isinstance(v, str) for v in tags.values())


@pytest.mark.parametrize("champion", [None, 0.7, 0.9])
def test_tags_round_trip_to_the_same_decision(champion: float | None) -> None:
    """A reused version's registered.json shows the recorded decision with its types (numbers, booleans)."""
    from birefnet.registry import GateDecision

    decision = gate(scores(0.8), scores(champion) if champion is not None else None,
                    "1" if champion is not None else None, "Sm", 0.001, SETS)
    back = GateDecision.from_tags({"other.tag": "x", **decision.to_tags()})
    assert back == decision
    assert back.to_dict() == decision.to_dict()
