"""The command-line tools: errors as one-paragraph messages, exit statuses, console scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from bvit_jax import cli
from bvit_jax.deploy import export, predict
from bvit_jax.errors import UserError
from bvit_jax.interop import timm as convert
from bvit_jax.train import trainer as train
from tests.train_helpers import ROOT, run_env

FMNIST = str(ROOT / "configs" / "fashion_mnist.py")


@pytest.mark.parametrize(
    "main, argv, message",
    [
        (
            train.main,
            [f"--config={FMNIST}:fp,tiny", "--workdir={tmp}", "--config.log_every_steps=0"],
            "bvit-train: error: config.log_every_steps=0 must be an integer >= 1",
        ),
        (
            train.main,
            [f"--config={FMNIST}:binaryvit,tiny", "--workdir={tmp}"],
            "bvit-train: error: preset 'binaryvit' distils from an fp teacher "
            "but config.distill.teacher_workdir is empty",
        ),
        (
            export.main,
            ["--workdir={tmp}/nothing", "--out={tmp}/m.bvit"],
            "bvit-export: error: {tmp}/nothing/config.json not found",
        ),
        (
            export.main,
            ["--workdir={tmp}", "--out={tmp}/m.bvit", "--labels={tmp}/none.txt"],
            "bvit-export: error: --labels={tmp}/none.txt: no such file",
        ),
        (
            predict.main,
            ["--model={tmp}/missing.bvit", "x.png"],
            "bvit-predict: error: cannot read the model file {tmp}/missing.bvit",
        ),
        (
            convert.main,
            ["--timm_model=resnet50", "--checkpoint=x.pth", "--workdir={tmp}/t"],
            "bvit-convert: error: unsupported timm model 'resnet50'",
        ),
    ],
)
def test_user_errors_print_one_message_without_a_traceback_and_exit_1(tmp_path, capsys, main, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err
    assert "Traceback" not in err
    # --traceback adds the Python traceback for debugging, the message stays last.
    assert main([*argv, "--traceback"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith(err.rstrip().splitlines()[-1])
    assert message.format(tmp=tmp_path) in err.strip().splitlines()[-1]


def test_flag_errors_exit_2_and_help_exits_0(capsys):
    assert export.main(["--workdir=a", "--out=b", "--wich=best"]) == 2
    err = capsys.readouterr().err
    assert "Unknown command line flag 'wich'" in err and "bvit-export --help" in err
    assert export.main(["--out=b"]) == 2  # a required flag is missing
    assert "--workdir" in capsys.readouterr().err
    assert predict.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--top_k" in out and "--[no]traceback" in out


def test_unexpected_exceptions_keep_their_traceback():
    """Only a UserError becomes a message; anything else (a bug) propagates with its traceback."""

    def define(fv, argv):
        flags.DEFINE_string("what", "bug", "which error", flag_values=fv)

    def run(fv, args):
        if fv["what"].value == "user":
            raise UserError("the input is wrong; do this instead")
        raise ZeroDivisionError("a bug")

    main = cli.command("bvit-toy", "A toy command.", define, run)
    assert main(["--what=user"]) == 1
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main([])


def test_console_script_trains_from_any_directory(tmp_path):
    """``bvit-train`` (the installed entry point), run outside the checkout, finds an installed config by name."""
    script = Path(sys.executable).parent / "bvit-train"
    assert script.exists(), "the package's console scripts are not installed (pip install -e .)"
    env = run_env()
    env.pop("PYTHONPATH")  # nothing but the installed package
    out = subprocess.run(
        [
            str(script),
            "--config=fashion_mnist.py:fp,tiny",  # no such file in cwd: bvit_jax.configs/fashion_mnist.py
            f"--workdir={tmp_path / 'run'}",
            "--config.total_steps=2",
            "--config.diagnostics_every_steps=0",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "final eval: top-1" in out.stdout
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_a_bare_config_name_is_the_installed_config_and_a_path_or_local_file_wins(tmp_path, monkeypatch):
    from bvit_jax.train.trainer import packaged_config

    monkeypatch.chdir(tmp_path)
    path, _, rest = packaged_config("fashion_mnist.py:binaryvit,tiny").partition(":")
    assert rest == "binaryvit,tiny" and Path(path).samefile(FMNIST)  # one copy: the checkout's configs/
    assert packaged_config("configs/fashion_mnist.py:fp") == "configs/fashion_mnist.py:fp"
    assert packaged_config("no_such_config.py:fp") == "no_such_config.py:fp"  # ml_collections names it
    (tmp_path / "fashion_mnist.py").write_text("")
    assert packaged_config("fashion_mnist.py:fp") == "fashion_mnist.py:fp"  # a file here is what was meant
