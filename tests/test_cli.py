"""The console script's dispatcher."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from device_runtime.cli import main as cli


#: The subcommands a user finds in the README, written out here (not read from
#: the table that builds the parser), each with a flag or sub-command of its own:
#: a command whose module fails to import shows a placeholder without them.
SUBCOMMANDS = {
    "simulate": ["--benchmark", "--routers"],
    "calibrate": ["--target-quality", "--telemetry"],
    "router": ["score"],
    "export": ["--out"],
    "serve": ["--n-slots"],
    "chat": ["--edge", "--policy"],
    "demo": ["--dialogues"],
    "profile": ["--out"],
    "bench": ["router"],
    "token": ["new"],
    "models": ["assemble"],
    "journal": ["list"],
}


def _subparsers(parser):
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_every_subcommand_is_listed_and_runnable():
    parser = cli.build_parser()
    text = parser.format_help()
    subs = _subparsers(parser)
    assert set(subs) == set(SUBCOMMANDS)
    for name, flags in SUBCOMMANDS.items():
        assert name in text
        sub = subs[name]
        # An import failure would leave the "(unavailable ...)" placeholder,
        # whose only option is -h.
        options = {o for a in sub._actions for o in a.option_strings}
        nested = [a.choices for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        names = options | {n for choices in nested for n in choices}
        assert set(flags) <= names, (name, sorted(names))


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2


def test_import_has_no_heavy_side_effects():
    # Building the parser must not import the model stacks.
    code = (
        "import sys; from device_runtime.cli import main as cli; cli.build_parser();"
        "heavy = [m for m in ('torch', 'transformers', 'optimum', 'llama_cpp', 'onnxruntime') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_command_whose_extra_is_missing_names_the_extra():
    """A device install has no torch: `export` says which extra to install
    instead of a traceback; a missing module that is not optional still raises."""
    code = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from device_runtime.cli.main import main
sys.exit(main(["export", "--out", sys.argv[1]]))
"""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", code, tmp + "/b"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "pip install 'edgeroute[export]'" in out.stderr
    assert cli._missing_extra("serve", ModuleNotFoundError(name="llama_cpp")) == "edge"
    assert cli._missing_extra("chat", ModuleNotFoundError(name="llama_cpp")) == "device"
    assert cli._missing_extra("chat", ModuleNotFoundError(name="device_runtime.typo")) is None


def test_bad_numbers_and_files_are_one_line_errors(tmp_path, capsys):
    bad_script = tmp_path / "script.txt"
    bad_script.write_bytes(b"\xff\xfe hi\n")
    notadir = tmp_path / "file"
    notadir.write_text("x")
    cases = [
        (["profile", "--parts", "router", "--answer-prompts", "0", "--threads", "0", "--json"],
         "threads must be >= 1"),
        (["chat", "--script", str(bad_script)], "not valid UTF-8"),
        (["simulate", "--benchmark", "gsm8k", "--data-dir", str(tmp_path), "--out", str(notadir / "sub")],
         "cannot create --out"),
        (["bench", "router", "--bundle", str(tmp_path), "--lengths", "0"], "--lengths must be"),
    ]
    bad_profile = tmp_path / "profile.json"
    bad_profile.write_bytes(b"\xff\xfe{}")
    huge_profile = tmp_path / "huge.json"
    huge_profile.write_text('{"gamma_s_prefill": 1' + "0" * 400 + "}")
    data = str(Path(__file__).parent / "fixtures" / "routellm_tiny")
    cases += [
        (["profile", "--parts", "router", "--answer-prompts", "0", "--out", str(tmp_path)], "cannot write --out"),
        (["simulate", "--benchmark", "gsm8k", "--data-dir", data, "--profile", str(bad_profile)], "not valid JSON"),
        (["simulate", "--benchmark", "gsm8k", "--data-dir", data, "--profile", str(huge_profile)],
         "gamma_s_prefill must be a non-negative number"),
        (["simulate", "--benchmark", "gsm8k", "--data-dir", data, "--response-lengths", "predicted",
          "--length-model", str(tmp_path)], "cannot read length model"),
    ]
    for argv, message in cases:
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert rc != 0 and message in err, (argv, err)
    for flag in ("--alpha", "--tau-r"):
        for value in ("inf", "1e308"):
            with pytest.raises(SystemExit) as exc:  # argparse
                cli.main(["simulate", "--benchmark", "gsm8k", "--data-dir", str(tmp_path), flag, value])
            assert exc.value.code == 2
            assert "finite number in [0, 1e6]" in capsys.readouterr().err
