"""``mlrepro compare --base REF TARGET``: a training compared across two commits of a real git repository.

The repository (built per test in tmp_path) holds ``gatemodel.py`` (a seeded 2-layer MLP, 8 SGD steps)
and ``scripts/train_gate.py`` (the target, which imports ``gatemodel`` from the repository root). The
second commit changes only ``gatemodel.py``: it scales the first layer's weight gradient at step 3. So
a difference found at step 3 also proves that each side imported its own copy of ``gatemodel``.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from pytest_mlrepro import cli, commits
from pytest_mlrepro.errors import ReplicaError

MODEL = textwrap.dedent("""\
    import torch

    SCALE_AT = None  # the step whose gradient is scaled (None: never)


    def fit(steps=8):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(steps):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            if step == SCALE_AT:
                model[0].weight.grad.mul_(1.5)
            opt.step()
        return model
    """)
TARGET = "def train():\n    from gatemodel import fit\n\n    return fit()\n"
CHANGED = MODEL.replace("SCALE_AT = None", "SCALE_AT = 3")
# a script that seeds nothing: its weights start from the global generator (the entropy a replica gets) and
# its batch order follows set iteration (the hash seed), so two sides agree only if both are the same; it
# reads its learning rate through a relative path (run with --cwd rootdir)
UNSEEDED = textwrap.dedent("""\
    import sys

    import torch

    model = torch.nn.Linear(4, 1)
    rows = [ord(c) % 8 for c in {"a", "b", "c", "d", "e", "f", "g", "h"}]
    x = torch.arange(32.0).reshape(8, 4)[rows]
    opt = torch.optim.SGD(model.parameters(), lr=float(open("lr.txt").read()))
    for step in range(int(sys.argv[1])):
        opt.zero_grad()
        model(x[step:step + 4]).pow(2).mean().backward()
        opt.step()
    """)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


class Sandbox:
    def __init__(self, root: Path, capsys):
        self.root, self.capsys = root, capsys
        self.repo, self.tmp = root / "repo", root / "tmp"

    def cli(self, *args: str) -> tuple[int, str, str]:
        """``mlrepro ARGS``; a comparison runs without torch's deterministic settings (they cost each replica a
        torch._inductor import, and these CPU trainings are deterministic without them), its sides forked from
        warm interpreters (torch imported once per worker, not once per side)."""
        self.capsys.readouterr()
        if args and args[0] == "compare":
            args = ("compare", "--deterministic", "false", "--isolation", "forkserver", *args[1:])
        rc = cli.main(list(args))
        out, err = self.capsys.readouterr()
        return rc, out, err

    def assert_clean(self) -> None:
        """Only the main worktree is registered, no temporary folder is left, and the user's tree holds
        nothing the comparison wrote (it is clean unless a test made it dirty)."""
        listed = git(self.repo, "worktree", "list", "--porcelain").splitlines()
        assert [line for line in listed if line.startswith("worktree ")] == [f"worktree {self.repo}"]
        assert not (self.repo / ".git" / "worktrees").exists() or not any((self.repo / ".git" / "worktrees").iterdir())
        assert sorted(os.listdir(self.tmp)) == []


@pytest.fixture
def box(tmp_path, monkeypatch, capsys):
    root = tmp_path.resolve()
    # git never reads the machine's or the user's configuration, and never finds a repository above root
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(root))
    b = Sandbox(root, capsys)
    b.tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(b.tmp))  # the temporary folders the comparison makes land here
    repo = b.repo
    (repo / "scripts").mkdir(parents=True)
    (repo / "gatemodel.py").write_text(MODEL)
    (repo / "scripts" / "train_gate.py").write_text(TARGET)
    (repo / "scripts" / "unseeded.py").write_text(UNSEEDED)
    (repo / "lr.txt").write_text("0.01\n")
    (repo / ".gitignore").write_text("__pycache__/\n")
    git(repo, "init", "-q")
    git(repo, "config", "user.name", "mlrepro test")
    git(repo, "config", "user.email", "mlrepro@example.invalid")
    git(repo, "config", "commit.gpgsign", "false")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "a seeded training")
    (repo / "gatemodel.py").write_text(CHANGED)
    (repo / "scripts" / "later.py").write_text(TARGET)  # exists only from the second commit on
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "scale the first layer's gradient at step 3")
    monkeypatch.chdir(repo)
    return b


def test_a_change_from_step_3_is_named_in_the_text_and_the_json(box):
    rc, out, err = box.cli("compare", "--base", "HEAD~1", "scripts/train_gate.py:train", "--json", str(box.root / "r.json"))
    assert rc == 1, (out, err)
    assert ("HEAD first differs from HEAD~1 at step 3: the gradient of `0.weight` (in `0` (Linear)) differs; "
            "every forward output matched") in out
    assert f"at HEAD~1 ({git(box.repo, 'rev-parse', 'HEAD~1')[:10]})" in out and "is clean" in out
    report = json.loads((box.root / "r.json").read_text())
    assert report["schema"] == "pytest-mlrepro/audit-result" and report["deterministic"] is False
    assert [r["environment"]["use_deterministic_algorithms"] for r in report["replicas"]] == [False, False]  # as asked, both sides
    div = report["first_divergence"]
    assert (div["step"], div["tensor"], div["phase"], div["module"], div["module_type"]) == (3, "0.weight", "backward", "0", "Linear")
    assert div["message"].startswith("HEAD first differs from HEAD~1 at step 3")
    finding = next(f for f in report["findings"] if f["check"] == commits.COMMITS)
    details = finding["details"]
    assert finding["verdict"] == "fail"
    assert details["base_ref"] == "HEAD~1" and details["base_commit"] == git(box.repo, "rev-parse", "HEAD~1")
    assert details["head_commit"] == git(box.repo, "rev-parse", "HEAD") and details["work_tree_dirty"] is False
    assert (details["first_step"], details["first_tensor"], details["phase"]) == (3, "0.weight", "backward")
    assert {t["name"] for t in report["tensors"] if t["status"] != "equal"} >= {"0.weight"}
    assert git(box.repo, "status", "--porcelain", "--untracked-files=all") == ""  # nothing written into the user's tree
    box.assert_clean()


def test_the_same_commit_agrees_with_the_same_entropy_and_hash_seed_on_both_sides(box):
    rc, out, err = box.cli("compare", "--base", "HEAD", "scripts/unseeded.py", "--deterministic", "false", "--cwd", "rootdir",
                           "--", "4")
    assert rc == 0, (out, err)
    assert "HEAD matches HEAD: 2 tensors bitwise-equal, every one of 4 optimizer steps identical" in out
    assert "is clean" in out
    assert git(box.repo, "status", "--porcelain", "--untracked-files=all") == ""
    box.assert_clean()


def test_a_dirty_work_tree_is_compared_as_it_is_and_said_so(box):
    # the uncommitted edit undoes the second commit: as it is, the work tree trains like HEAD~1 (HEAD does not)
    (box.repo / "gatemodel.py").write_text(MODEL)
    # (torch's deterministic settings off: a table option reaches both sides, and each replica starts faster)
    rc, out, err = box.cli("compare", "--base", "HEAD~1", "scripts/train_gate.py:train", "--json", str(box.root / "r.json"),
                           "--deterministic", "false")
    assert rc == 0, (out, err)
    assert "the work tree (HEAD with uncommitted changes) matches HEAD~1" in out
    assert "has uncommitted changes in 1 path (gatemodel.py) and was compared as it is" in out
    report = json.loads((box.root / "r.json").read_text())
    assert report["deterministic"] is True and report["first_divergence"] is None
    assert [r["environment"]["use_deterministic_algorithms"] for r in report["replicas"]] == [False, False]
    finding = next(f for f in report["findings"] if f["check"] == commits.COMMITS)
    assert finding["verdict"] == "pass" and "compared as it is" in finding["message"]
    assert finding["details"]["work_tree_dirty"] is True and finding["details"]["dirty_paths"] == ["gatemodel.py"]
    assert (box.repo / "gatemodel.py").read_text() == MODEL  # left as it was
    box.assert_clean()


def test_an_unknown_ref_is_a_usage_error_naming_it(box):
    rc, out, err = box.cli("compare", "--base", "no-such-ref", "scripts/train_gate.py:train")
    assert rc == 2
    assert "unknown ref 'no-such-ref'" in err and "Traceback" not in out + err
    box.assert_clean()


def test_outside_a_git_repository_is_a_usage_error(box, monkeypatch):
    outside = box.root / "outside"
    outside.mkdir()
    (outside / "train_gate.py").write_text(TARGET)
    monkeypatch.chdir(outside)
    rc, out, err = box.cli("compare", "--base", "HEAD", "train_gate.py:train")
    assert rc == 2
    assert f"{outside} is not inside a git work tree" in err and "Traceback" not in out + err
    assert sorted(os.listdir(box.tmp)) == []


def test_a_target_missing_at_the_ref_is_a_usage_error_naming_it(box):
    rc, out, err = box.cli("compare", "--base", "HEAD~1", "scripts/later.py:train")
    assert rc == 2
    assert "scripts/later.py does not exist at HEAD~1" in err and "Traceback" not in out + err
    box.assert_clean()


def test_a_bad_option_value_gives_the_audit_command_s_message(box):
    messages = []
    for command in ("audit", "compare"):
        box.capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "scripts/train_gate.py:train", "--seed", "-1", *(["--base", "HEAD"] if command == "compare" else [])])
        assert exit_info.value.code == 2
        messages.append(box.capsys.readouterr().err.strip().splitlines()[-1].split(" error: ", 1)[1])
    assert messages[0] == messages[1] == "argument --seed: seed must be a whole number from 0 to 4294967295, got -1"
    rc, out, err = box.cli("compare", "--base", "HEAD", "scripts/train_gate.py:train", "--isolation", "inprocess")
    assert rc == 2 and "isolation='inprocess'" in err
    box.assert_clean()


@pytest.mark.parametrize("failure", ["interrupt", "replica", "crash"])
def test_the_worktree_is_removed_whatever_stops_the_comparison(box, monkeypatch, failure):
    seen = []

    def stopped(spec, out_dir, **kw):
        registered = [line for line in git(box.repo, "worktree", "list", "--porcelain").splitlines() if line.startswith("worktree ")]
        seen.append((len(registered), Path(spec.target.path).is_file()))  # the worktree exists while sides run
        if failure == "interrupt":
            raise KeyboardInterrupt
        if failure == "replica":
            raise ReplicaError(f"replica 0 of {spec.target.display} failed: RuntimeError: boom", replica=0,
                               traceback="Traceback (most recent call last):\nRuntimeError: boom\n", kind="RuntimeError")
        raise RuntimeError("an unexpected failure")

    monkeypatch.setattr(commits, "run", stopped)
    args = ["compare", "--base", "HEAD~1", "scripts/train_gate.py:train"]
    if failure == "crash":
        with pytest.raises(RuntimeError, match="an unexpected failure"):
            cli.main(args)
    else:
        rc, out, err = box.cli(*args)
        if failure == "interrupt":
            assert rc == 130 and "interrupted by SIGINT" in err
        else:
            assert rc == 1
            assert "could not compare HEAD with HEAD~1: replica 0 of scripts/train_gate.py:train at HEAD~1 failed" in out
    assert seen and set(seen) == {(2, True)}  # one call per side that started (both, when they run at once)
    box.assert_clean()


def test_pytest_mlrepro_base_turns_each_audit_into_a_comparison_of_commits(box):
    """`pytest --mlrepro --mlrepro-base=REF`: a marked test fails where this commit parts from REF, and one
    whose training did not change between the commits passes."""
    import sys

    (box.repo / "test_gate.py").write_text(
        "import pytest\n\n\n@pytest.mark.mlrepro('scripts/train_gate.py:train')\ndef test_changed():\n    pass\n\n\n"
        "@pytest.mark.mlrepro('scripts/unseeded.py', args=['4'], cwd='rootdir')\ndef test_unchanged():\n    pass\n")
    env = {**os.environ, "TMPDIR": str(box.tmp)}

    def pytest_run(ref: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "--mlrepro", f"--mlrepro-base={ref}", "-p", "no:cacheprovider",
                               "-o", "mlrepro_wandb=disabled", "-o", "mlrepro_deterministic=false",
                               "-o", "mlrepro_isolation=forkserver", "test_gate.py"], cwd=box.repo, env=env,
                              capture_output=True, text=True, timeout=300)

    differs = pytest_run("HEAD~1")
    assert differs.returncode == 1, differs.stdout + differs.stderr
    assert "1 failed, 1 passed" in differs.stdout, differs.stdout  # the unchanged script agrees across the commits
    assert "FAILED test_gate.py::test_changed" in differs.stdout
    assert "first differs from HEAD~1 at step 3" in differs.stdout, differs.stdout
    assert "base=HEAD~1" in differs.stdout  # the header says what the session compares with
    unknown = pytest_run("no-such-ref")
    assert unknown.returncode == 1 and "no-such-ref" in unknown.stdout and "Traceback" not in unknown.stdout
    assert [line for line in git(box.repo, "worktree", "list", "--porcelain").splitlines()
            if line.startswith("worktree ")] == [f"worktree {box.repo}"]
