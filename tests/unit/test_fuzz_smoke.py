"""A short coverage-guided fuzzing run of each atheris target: CI catches the easy crashes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"


@pytest.mark.parametrize(("target", "seconds"), [("smtp_server", 8), ("smtp_client", 4)])
def test_fuzz_target_survives_a_short_run(tmp_path: Path, target: str, seconds: int) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / target.removeprefix("smtp_"), corpus)
    before = len(list(corpus.iterdir()))
    out = subprocess.run(
        [sys.executable, str(FUZZ / f"{target}.py"), f"-max_total_time={seconds}", str(corpus)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done " in out.stderr  # the fuzzer ran to its time limit
    assert len(list(corpus.iterdir())) > before  # and found new coverage: it really ran
    assert not list(tmp_path.glob("crash-*"))
