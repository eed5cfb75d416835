"""The command line's own rules: every flag explained, folders expanded, retries suggested only when they help."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from batch.cli import retry_may_help
from hybridcn.cli import build_parser
from hybridcn.cli.errors import CliError
from hybridcn.cli.local import collect_files


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_flag_of_every_command_has_help_text():
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, sub in _subparsers(build_parser()) for action in sub._actions
               if not isinstance(action, argparse._HelpAction) and not action.help]
    assert missing == []


def test_folders_are_expanded_recursively_and_sorted(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    for name in ("b/c/2.PNG", "b/1.jpg", "a.tif", "b/readme.txt"):
        (tmp_path / name).write_bytes(b"x")
    files = collect_files([tmp_path / "b", tmp_path / "a.tif"])
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["b/1.jpg", "b/c/2.PNG", "a.tif"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CliError, match="no image files"):
        collect_files([tmp_path / "empty"])
    with pytest.raises(CliError, match="no such file or folder"):
        collect_files([Path(tmp_path / "missing.png")])


def test_retry_failed_is_suggested_only_for_errors_a_retry_can_fix():
    assert retry_may_help("inference failed after 3 attempts: Triton at 127.0.0.1:9 failed")
    assert retry_may_help("unreadable: cannot read /mnt/share/f1.png: Stale file handle")
    for corrupt in ("truncated: image data is corrupt", "not_an_image: not a JPEG, PNG, TIFF or BMP",
                    "too_many_pixels: 80000000 pixels"):
        assert not retry_may_help(corrupt)
