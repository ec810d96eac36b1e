"""Real sizes: a tensor past 2**24 elements audits end to end, and memory stays bounded (the parent
streams the comparison tensor by tensor, a replica saves its weights without copying them)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pytest_mlrepro import audit
from pytest_mlrepro import compare as compare_module
from pytest_mlrepro.compare import compare_state_files, compare_states
from pytest_mlrepro.replica import _storable
from pytest_mlrepro.trace import SAMPLES_PER_TENSOR, sample_indices

TARGETS = Path(__file__).resolve().parent / "targets"
REALSIZE = str(TARGETS / "realsize.py")
NUMEL = 50257 * 800


@pytest.mark.parametrize("numel", [1, 2, 5, 15, 16, 17, 2**24 - 1, 2**24 + 1, 50257 * 768, 32000 * 4096, 10**8, 2**40 + 3])
def test_sample_indices_are_exact_integers_spread_over_the_whole_tensor(numel):
    t = torch.empty(1).expand(numel)  # numel elements, one float of memory
    idx = sample_indices(t)
    assert idx.dtype == torch.long and idx.numel() == SAMPLES_PER_TENSOR
    assert idx[0] == 0 and idx[-1] == numel - 1
    assert bool((idx[1:] >= idx[:-1]).all()) and int(idx.max()) < numel


def test_sample_indices_of_empty_and_complex_tensors():
    assert sample_indices(torch.empty(0)).numel() == 0
    assert int(sample_indices(torch.zeros(5, dtype=torch.complex64))[-1]) == 9  # real and imaginary parts


def test_a_gpt2_sized_embedding_audits_as_deterministic(tmp_path):
    result = audit(f"{REALSIZE}:embedding", workdir=tmp_path, runs=2, device="cpu")
    assert result.error is None, result.explain()
    assert result.deterministic and result.verdict == "deterministic", result.explain()
    by_name = {t.name: t for t in result.tensors}
    assert by_name["0.weight"].numel == NUMEL and by_name["0.weight"].status == "equal"
    assert result.replicas[0].steps == 2


def test_a_divergence_in_the_last_element_of_a_40m_element_tensor_is_found(tmp_path):
    # the trace alone names step and tensor; no replays or diagnosis (each would be two more replicas)
    result = audit(f"{REALSIZE}:embedding", kwargs={"perturb_step": 1}, workdir=tmp_path, runs=2, device="cpu",
                   localize_divergence=False, diagnose=False)
    assert result.error is None, result.explain()
    assert not result.deterministic
    div = result.first_divergence
    assert (div.step, div.tensor, div.tensors) == (1, "0.weight", ["0.weight"]), result.explain()
    differing = {t.name: t for t in result.differing_tensors}
    assert list(differing) == ["0.weight"]
    assert differing["0.weight"].fraction_differing == pytest.approx(1 / NUMEL)
    # the last element is one of the trace's samples: the divergence curve sees it at the step it happened
    curve = {row["step"]: row["max_abs_diff_sampled"] for row in result.step_divergence}
    assert curve[0] == 0.0 and curve[1] > 0.0


# -- memory: the parent streams, the replica does not copy ---------------------------------------------


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc to read the resident set")
def test_comparing_files_holds_about_one_pair_of_tensors_at_a_time(tmp_path, monkeypatch):
    size = 4 * 2**20  # elements: 16 MiB per float32 tensor, 8 tensors = 128 MiB per state
    a = {f"layer{i}": torch.randn(size) for i in range(8)}
    torch.save(a, tmp_path / "a.pt")
    a["layer5"][-1] += 1
    torch.save(a, tmp_path / "b.pt")
    del a
    seen = []
    original = compare_module._compare_counting

    def probe(*args):
        out = original(*args)  # both tensors of this key have just been read in full
        seen.append(_resident_bytes())
        return out

    monkeypatch.setattr(compare_module, "_compare_counting", probe)
    before = _resident_bytes()
    result = compare_state_files(tmp_path / "a.pt", tmp_path / "b.pt")
    assert [d.name for d in result.diffs if not d.equal] == ["layer5"]
    growth = max(seen) - before
    pair, state = 2 * size * 4, 8 * size * 4
    # one pair read in full plus the comparison's chunk temporaries; both whole states would be 2 * state
    assert growth < state, (f"resident set grew by {growth / 2**20:.0f} MiB while comparing; one pair of tensors is "
                            f"{pair / 2**20:.0f} MiB, one whole state {state / 2**20:.0f} MiB")


def test_streamed_comparison_rereads_a_storage_two_keys_share(tmp_path):
    """Pages dropped after the first key are read again from the file for the second: tied weights
    compare correctly, however many keys share a storage."""
    w = torch.randn(2**20)
    torch.save({"emb": w, "head": w}, tmp_path / "tied.pt")  # one storage, saved once
    torch.save({"emb": w.clone(), "head": w.clone()}, tmp_path / "separate.pt")
    result = compare_state_files(tmp_path / "tied.pt", tmp_path / "separate.pt")
    assert [d.status for d in result.diffs] == ["equal", "equal"]
    again = compare_state_files(tmp_path / "separate.pt", tmp_path / "tied.pt")
    assert [d.status for d in again.diffs] == ["equal", "equal"]


def test_a_legacy_file_is_read_whole_and_its_memory_left_alone(tmp_path):
    """torch cannot map a pre-zip file: it is loaded into ordinary memory, where dropping pages would
    zero them (the tied second key would then differ)."""
    w = torch.randn(2**20)
    torch.save({"emb": w, "head": w}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"emb": w.clone(), "head": w.clone()}, tmp_path / "new.pt")
    result = compare_state_files(tmp_path / "legacy.pt", tmp_path / "new.pt")
    assert [d.status for d in result.diffs] == ["equal", "equal"]


def test_streamed_comparison_agrees_with_the_in_memory_one(tmp_path):
    a = {"w": torch.randn(300, 7), "n": {"b": torch.arange(5), "s": "x"}, "only_a": torch.zeros(2), "h": torch.randn(9).half()}
    b = {"w": a["w"].clone(), "n": {"b": torch.arange(5) + 1, "s": "x"}, "h": a["h"].clone().reshape(3, 3),
         "only_b": 1.5}
    b["w"][3, 4] = float("nan")
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    for mode, extra in [("bitwise", {}), ("tolerance", {"atol": 1e-3}), ("ulp", {"max_ulp": 2})]:
        streamed = compare_state_files(tmp_path / "a.pt", tmp_path / "b.pt", mode=mode, **extra)
        assert streamed.diffs == compare_states(a, b, mode=mode, **extra)
    assert [d.status for d in streamed.diffs] == ["different", "different", "equal", "missing_in_other",
                                                  "shape_mismatch", "missing_in_reference"]
    with pytest.raises(ValueError, match="unknown comparison mode"):
        compare_state_files(tmp_path / "a.pt", tmp_path / "b.pt", mode="close")


def test_the_audit_never_loads_a_replicas_weights_whole(tmp_path, monkeypatch):
    loads = []
    original = torch.load

    def spy(f, *args, **kwargs):
        loads.append((Path(f).name, kwargs.get("mmap")))
        return original(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    result = audit(f"{TARGETS / 'tiny.py'}:train", workdir=tmp_path, runs=3, device="cpu", isolation="inprocess")
    assert result.deterministic, result.explain()
    weights = [mmap for name, mmap in loads if name == "weights.pt"]
    assert weights and all(weights), loads


def test_a_replica_saves_trained_tensors_without_copying_them():
    t = torch.randn(64, 64, requires_grad=True)
    stored = _storable(t)
    assert stored.data_ptr() == t.data_ptr() and not stored.requires_grad
    row = torch.randn(64, 64)[3]  # a view: torch.save would write the whole 64 x 64 storage
    kept = _storable(row)
    assert torch.equal(kept, row) and kept.untyped_storage().nbytes() == row.numel() * row.element_size()
    transposed = torch.randn(8, 4).t()  # covers its storage exactly: saved as it is
    assert _storable(transposed).data_ptr() == transposed.data_ptr()
