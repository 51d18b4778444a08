"""The ``minilora`` command fails in one line: every bad argument is refused before any work, every
error is one line on stderr with a non-zero exit (a traceback only with --debug), every --help shows
the defaults, nothing is written inside the installed package, Ctrl-C ends with the command that
resumes, and a diverged run does not replace a previous model without --force."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minilora
from minilora import backend, cli
from minilora.cli import main as cli_main
from _children import sigint_by_default  # noqa: E402
from _tiny_llama import save_tiny_base  # noqa: E402

PACKAGE = Path(minilora.__file__).resolve().parent
TINY = ["--hidden-size", "16", "--layers", "1", "--heads", "2", "--intermediate-size", "32",
        "--block-size", "32", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1",
        "--max-chars", "20000", "--no-progress"]


def one_line_error(capsys, rc) -> str:
    """The stderr of a failed command: exactly one line, no traceback, and a non-zero exit."""
    out = capsys.readouterr()
    err = out.err.strip()
    assert rc != 0
    assert err.count("\n") == 0, err
    assert "Traceback" not in err and err.startswith("minilora ")
    return err


def run_cli(argv):
    """cli_main, with argparse's SystemExit turned into its exit code."""
    try:
        return cli_main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture
def no_training(monkeypatch):
    """Any call of train() fails the test: the argument checks must come before any work."""
    def refuse(*a, **kw):
        raise AssertionError("training started before the arguments were checked")
    monkeypatch.setattr("minilora.train.train", refuse)


@pytest.mark.parametrize("argv, says", [
    (["pretrain", "--lr", "nan"], "argument --lr: must be a finite number in (0, inf), got nan"),
    (["pretrain", "--lr", "-1e-3"], "argument --lr"),
    (["pretrain", "--lr", "inf"], "argument --lr"),
    (["pretrain", "--layers", "0"], "argument --layers: must be >= 1, got 0"),
    (["pretrain", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["pretrain", "--steps", "ten"], "argument --steps: expected an integer >= 1, got 'ten'"),
    (["pretrain", "--batch-size", "0"], "argument --batch-size"),
    (["pretrain", "--threads", "0"], "argument --threads"),
    (["pretrain", "--min-lr-ratio", "2"], "argument --min-lr-ratio"),
    (["pretrain", "--hidden-size", "30", "--heads", "4"], "must be a multiple of --heads"),
    (["pretrain", "--heads", "4", "--kv-heads", "3"], "must be a multiple of --kv-heads 3"),
    (["pretrain", "--copy-fraction", "1"], "--copy-fraction must be in [0, 1)"),
    (["pretrain", "--resume", "no-such-folder"], "--resume no-such-folder is not a folder"),
    (["pretrain", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["demo", "--steps", "0"], "argument --steps"),
    (["demo", "--rank", "0"], "argument --rank"),
    (["demo", "--lr", "nan"], "argument --lr"),
    (["demo", "--base", "no-such-folder"], "--base no-such-folder is not a folder"),
    (["finetune", "--checkpoint-every", "0"], "argument --checkpoint-every"),
    (["finetune", "--lr", "nan"], "argument --lr: must be a finite number in (0, inf), got nan"),
    (["finetune", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["finetune", "--dropout", "1"], "argument --dropout"),
    (["finetune", "--resume", "nowhere"], "nowhere: no checkpoint to resume from"),
])
def test_bad_arguments_fail_at_once_in_one_line(argv, says, capsys, tmp_path, monkeypatch,
                                                no_training):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, run_cli(argv))
    assert says in err
    assert not any(tmp_path.iterdir())          # nothing written


@pytest.mark.parametrize("command", ["pretrain", "demo", "finetune"])
def test_out_naming_a_file_or_the_package_is_refused_before_any_work(command, capsys, tmp_path,
                                                                    monkeypatch, no_training):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("keep me")
    err = one_line_error(capsys, run_cli([command, "--out", "a-file"]))
    assert "--out a-file is an existing file" in err
    assert (tmp_path / "a-file").read_text() == "keep me"
    inside = PACKAGE / "assets" / "base-model"
    err = one_line_error(capsys, run_cli([command, "--out", str(inside)]))
    assert "inside the installed minilora package" in err


def fingerprint(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_pretrain_writes_to_the_working_folder_never_the_package(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = fingerprint(PACKAGE / "assets")
    assert cli_main(["pretrain", "--steps", "2", *TINY]) == 0
    assert (tmp_path / "minilora-base" / "model.safetensors").is_file()
    assert (tmp_path / "minilora-base-checkpoints" / "checkpoint-000002").is_dir()
    assert f"saved to minilora-base" in capsys.readouterr().out
    assert fingerprint(PACKAGE / "assets") == shipped


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    import minilora.commands.pretrain as pretrain

    def broken(args):
        raise ZeroDivisionError("division by zero")
    monkeypatch.setattr(pretrain, "run", broken)
    err = one_line_error(capsys, run_cli(["pretrain"]))
    assert err == ("minilora pretrain: error: ZeroDivisionError: division by zero "
                   "(--debug shows the traceback)")
    with pytest.raises(ZeroDivisionError):
        cli_main(["--debug", "pretrain"])
    with pytest.raises(ZeroDivisionError):
        cli_main(["pretrain", "--debug"])

    def multi_line(args):
        raise ValueError("first line\nsecond line")
    monkeypatch.setattr(pretrain, "run", multi_line)
    assert "first line second line" in one_line_error(capsys, run_cli(["pretrain"]))


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_every_help_shows_the_defaults(name, capsys):
    assert run_cli([name, "--help"]) == 0
    text = capsys.readouterr().out
    assert "--debug" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    module = __import__(cli.SUBCOMMANDS[name][0], fromlist=["add_arguments"])
    parser = cli.build_subparser(name, module)
    shown = " ".join(text.split())
    for action in parser._actions:
        if action.default not in (None, False) and action.help and action.default != "==SUPPRESS==":
            assert f"(default: {action.default})" in shown, (name, action.dest)


def test_pretrain_help_names_the_defaults_in_words(capsys):
    assert run_cli(["pretrain", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 3000)" in text and "(default: minilora-base)" in text
    assert "default:OUT-checkpoints" in text.replace(" ", "")   # help wraps lines at hyphens


def test_a_diverged_run_does_not_replace_a_previous_model_without_force(capsys, tmp_path,
                                                                        monkeypatch):
    import minilora.train as train_mod
    real_train = train_mod.train

    def diverging(*a, **kw):
        history = real_train(*a, **kw)
        history.diverged = "the gradients were exactly zero for 5 steps in a row (steps 1-5)"
        return history
    monkeypatch.setattr(train_mod, "train", diverging)
    monkeypatch.chdir(tmp_path)
    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / "model.safetensors").write_bytes(b"the previous model")
    err = one_line_error(capsys, run_cli(["pretrain", "--steps", "2", "--out", "prev", *TINY]))
    assert "training diverged (the gradients were exactly zero" in err and "--force" in err
    assert (prev / "model.safetensors").read_bytes() == b"the previous model"
    assert cli_main(["pretrain", "--steps", "2", "--out", "prev", "--force", *TINY]) == 0
    assert (prev / "model.safetensors").read_bytes() != b"the previous model"
    # a fresh folder is written (there is nothing to lose); the warning was shown
    assert cli_main(["pretrain", "--steps", "2", "--out", "fresh", *TINY]) == 0


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("tiny-base"))


def test_demo_outputs_go_to_the_named_folder_and_are_printed(tiny_base, capsys, tmp_path,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["demo", "--base", str(tiny_base), "--steps", "2", "--n-eval", "2", "--show",
                     "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"outputs in {tmp_path / 'minilora-demo'}" in out
    assert (tmp_path / "minilora-demo" / "adapter" / "adapter_config.json").is_file()
    assert "minilora-demo/" in (Path(__file__).parent.parent / ".gitignore").read_text().split()


def test_ctrl_c_during_pretrain_says_how_to_resume_and_resume_finishes(tmp_path):
    """A child runs ``minilora pretrain``; SIGINT after its first checkpoint ends it with exit 130
    and one line naming ``--resume DIR``; that command then finishes the run."""
    args = ["--steps", "400", "--checkpoint-every", "2", "--out", "base", *TINY]
    child = subprocess.Popen([sys.executable, "-m", "minilora", "pretrain", *args], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=sigint_by_default)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "base-checkpoints").glob("checkpoint-*/trainer_state.json")):
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("minilora pretrain: interrupted after step ") and "Traceback" not in err
    resume_dir = last.split("--resume ")[1].split(" (")[0]
    assert Path(tmp_path / resume_dir).is_dir() or Path(resume_dir).is_dir()
    done = subprocess.run([sys.executable, "-m", "minilora", "pretrain", *args, "--resume",
                           resume_dir], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "base" / "model.safetensors").is_file()
    ckpts = sorted((tmp_path / "base-checkpoints").glob("checkpoint-*"))
    assert ckpts[-1].name == "checkpoint-000400"
    np.testing.assert_equal(len(ckpts), 2)    # the newest two are kept


def test_finetune_interrupted_and_resumed_equals_the_whole_run(tiny_base, capsys, tmp_path,
                                                               monkeypatch):
    """Ctrl-C after step 3 of 6 (raised in-process right after the step's update) exits 130 with
    the resume command; ``finetune --resume OUT-checkpoints`` with the same arguments then saves
    the adapter of the uninterrupted run, bit for bit (LoRA dropout 0.1: the generators matter)."""
    from safetensors.numpy import load_file

    import minilora.train as train_mod
    monkeypatch.chdir(tmp_path)
    common = ["finetune", "--base", str(tiny_base), "--n-train", "40", "--n-test", "0",
              "--batch-size", "4", "--dropout", "0.1", "--steps", "6", "--no-progress"]
    assert cli_main([*common, "--out", "whole"]) == 0
    real_update = train_mod._DivergenceWatch.update

    def ctrl_c_at_step_3(self, step, loss, grad_norm):
        if step == 3:
            raise KeyboardInterrupt
        return real_update(self, step, loss, grad_norm)
    monkeypatch.setattr(train_mod._DivergenceWatch, "update", ctrl_c_at_step_3)
    capsys.readouterr()
    assert cli_main([*common, "--out", "part"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("minilora finetune: interrupted after step 3 of 6; resume with: minilora finetune "
                   "--resume part-checkpoints/checkpoint-000003 (and the same other arguments)")
    assert not (tmp_path / "part").exists()
    monkeypatch.setattr(train_mod._DivergenceWatch, "update", real_update)
    assert cli_main([*common, "--out", "part", "--resume", "part-checkpoints"]) == 0
    whole = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    part = load_file(str(tmp_path / "part" / "adapter_model.safetensors"))
    assert whole.keys() == part.keys()
    for k in whole:
        np.testing.assert_array_equal(whole[k], part[k], err_msg=k)
