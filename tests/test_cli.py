"""The command line: bad input is a one-line error without a traceback; --help explains every option."""

import subprocess
import sys


def test_bad_input_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nemo_upcycle.cli", "demo", "--router", "bogus"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "nemo_upcycle.cli", "demo", "--dense", str(tmp_path / "x.nemo"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: dense checkpoint")


def test_every_command_documents_every_option():
    import argparse

    from nemo_upcycle.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.dest != "help" and action.help != argparse.SUPPRESS:
                assert action.help and len(action.help) > 10, f"{name} {action.dest}"
