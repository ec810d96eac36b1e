"""fastai: real EarlyStoppingCallback / SaveModelCallback in a real Learner.fit."""
import pytest

pytest.importorskip("fastai.callback.tracker")
np = pytest.importorskip("numpy")

from pytest_mlrepro.checkpoint.adapters.fastai import (  # noqa: E402
    FastaiDriver, checkpoint_factory, early_stopping_factory, supported_specs)
from pytest_mlrepro.checkpoint.conformance import check_comparator, check_conformance  # noqa: E402
from pytest_mlrepro.checkpoint.oracle import simulate  # noqa: E402

pytestmark = pytest.mark.frameworks


@pytest.mark.parametrize("cbs", [{"early_stopping": {}}, {"early_stopping": {}, "save_model": {}}])
def test_mae_with_default_comp_is_maximised(cbs):
    f = check_comparator(lambda: FastaiDriver("mae", **cbs), monitor="mae")
    assert f.verdict == "fail", f
    assert (f.details["observed_mode"], f.details["expected_mode"]) == ("max", "min")


def test_mae_with_comp_np_less_passes():
    f = check_comparator(lambda: FastaiDriver("mae", early_stopping={"comp": np.less}, save_model={"comp": np.less}),
                         monitor="mae")
    assert f.verdict == "pass", f


def test_own_recorder_columns_are_refused():
    with pytest.raises(ValueError, match="Recorder columns"):
        FastaiDriver("valid_loss", early_stopping={})


def test_early_stopping_conforms():
    f = check_conformance(early_stopping_factory("valid_score"), monitor="valid_score", specs=supported_specs(),
                          max_examples=15)
    assert f.verdict == "pass", f.message


def test_save_model_crashes_when_no_epoch_ever_improved():
    """SaveModelCallback.after_fit loads 'model.pth' unconditionally: a run with no improvement
    (first value NaN or the worst infinity) ends in FileNotFoundError."""
    f = check_conformance(checkpoint_factory("valid_score"), monitor="valid_score", specs=supported_specs(),
                          max_examples=15)
    assert f.verdict == "error", f
    assert "FileNotFoundError" in f.details["observed"]["error"]
    assert len(f.details["counterexample"]) == 1


def test_save_model_conforms_on_finite_sequences():
    f = check_conformance(checkpoint_factory("valid_score"), monitor="valid_score", specs=supported_specs(),
                          allow_nan=False, allow_inf=False, max_examples=15)
    assert f.verdict == "pass", f.message


def test_save_model_loads_the_oracle_best_epoch():
    values = [1.0, 0.5, 0.75, 0.25, 0.5, 0.5, 0.5]
    d = FastaiDriver("mae", early_stopping={"comp": np.less, "patience": 2}, save_model={"comp": np.less})
    got, want = d.run(values), simulate(values, d.spec)
    assert got == want, (got, want)
    assert d.last_run["best_weights_epoch"] == 3 and d.last_run["files"] == ["model.pth"]
