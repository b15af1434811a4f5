"""The console script's dispatcher."""

import subprocess
import sys

from device_runtime import cli


def test_help_lists_every_subcommand(capsys):
    parser = cli.build_parser()
    text = parser.format_help()
    for name in cli.COMMANDS:
        assert name in text


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2


def test_import_has_no_heavy_side_effects():
    # Building the parser must not import the model stacks.
    code = (
        "import sys; from device_runtime import cli; cli.build_parser();"
        "heavy = [m for m in ('torch', 'transformers', 'optimum', 'llama_cpp', 'onnxruntime') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
