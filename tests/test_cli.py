"""The ``birefnet`` dispatcher: version and usage."""

from __future__ import annotations

from importlib.metadata import version

import pytest

import birefnet
from birefnet.cli import main


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flag_prints_the_installed_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([flag]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"birefnet {birefnet.__version__}"
    assert birefnet.__version__ == version("birefnet-pipeline")


def test_unknown_command_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err
