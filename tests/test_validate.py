"""The shared argument checks: the non-finite policy vocabulary and the Stateful defaults."""

import pytest

from gradkit._stateful import Stateful
from gradkit._validate import NONFINITE_POLICIES, check_nonfinite


def test_vocabulary_is_the_decided_one():
    assert NONFINITE_POLICIES == ("raise", "skip", "worst", "ignore")


@pytest.mark.parametrize("value", ["raise", "skip", "ignore"])
def test_single_stage_values_pass_through(value):
    assert check_nonfinite(value) == value


def test_worst_is_for_population_stages_only():
    with pytest.raises(ValueError, match="cannot be honoured by AdamW"):
        check_nonfinite("worst", where="AdamW")
    assert check_nonfinite("worst", allowed=NONFINITE_POLICIES) == "worst"


@pytest.mark.parametrize("bad", ["Raise", "nan", None, 1, "warn"])
def test_unknown_words_name_the_argument_and_the_choices(bad):
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \('raise', 'skip'\)"):
        check_nonfinite(bad, allowed=("raise", "skip"))


def test_allowed_must_be_in_the_vocabulary():
    with pytest.raises(ValueError, match="allowed"):
        check_nonfinite("raise", allowed=("raise", "warn"))


def test_stateful_defaults():
    class Thing(Stateful):
        pass

    t = Thing()
    assert t.state_dict() == {}
    t.load_state_dict({})
    with pytest.raises(ValueError, match=r"Thing has no state, got keys \['a'\]"):
        t.load_state_dict({"a": 1})


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_non_finite_hyper_parameters_are_refused_naming_them(bad):
    from gradkit._validate import check_nonneg, check_positive, check_range

    for check in (check_nonneg, check_positive):
        with pytest.raises(ValueError, match="lr must be"):
            check("lr", bad)
    with pytest.raises(ValueError, match="growth_rate"):
        check_range("growth_rate", float("nan"), 1.0, allow_inf=True)
    assert check_range("growth_rate", float("inf"), 1.0, allow_inf=True) == float("inf")
