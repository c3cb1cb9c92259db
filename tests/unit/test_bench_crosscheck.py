"""The cross-check's copy of the team's generator (bench/chatbench/crosscheck.py): found at ../shared/bench beside
the repository wherever it is checked out, copied unchanged, refused when missing or older than 1.2.0."""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

import pytest

from chatbench import crosscheck
from chatbench.crosscheck import FanoutCopy

# The line chatbench once patched in its copy: kept in the fake, so that a patch coming back shows in the copy.
OLD_LOOP = "  let p = data.indexOf(MARK);\n"


def fake_source(directory: Path, version: str = "1.2.0") -> Path:
    directory.mkdir()
    (directory / "fanout.mjs").write_text(f"import WebSocket from 'ws';\n\nconst VERSION = '{version}';\n{OLD_LOOP}")
    (directory / "package.json").write_text('{"name": "chat-bench", "version": "0.1.0"}\n')
    (directory / "package-lock.json").write_text('{"name": "chat-bench", "lockfileVersion": 3}\n')
    return directory


def copy_without_npm(source: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FanoutCopy, list[Path]]:
    installed: list[Path] = []
    monkeypatch.setattr(crosscheck, "npm_ci", installed.append)
    return FanoutCopy(source), installed


def test_source_is_shared_bench_beside_the_repository_wherever_it_is_checked_out(tmp_path: Path) -> None:
    # A copy of the module in another checkout must look beside that checkout: an absolute path would not move.
    module = tmp_path / "elsewhere" / "bench" / "chatbench" / "crosscheck.py"
    module.parent.mkdir(parents=True)
    shutil.copy(crosscheck.__file__, module)
    moved = runpy.run_path(str(module))
    assert moved["SOURCE"].resolve() == (tmp_path / "shared" / "bench").resolve()
    assert crosscheck.SOURCE.resolve() == (Path(__file__).resolve().parents[2] / ".." / "shared" / "bench").resolve()


def test_copy_runs_the_generator_as_it_is_after_npm_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = fake_source(tmp_path / "bench")
    fanout, installed = copy_without_npm(source, monkeypatch)
    try:
        assert fanout.dir != source
        for name in ("fanout.mjs", "package.json", "package-lock.json"):
            assert (fanout.dir / name).read_bytes() == (source / name).read_bytes()
        assert installed == [fanout.dir]
    finally:
        fanout.remove()
    assert not fanout.dir.exists()


def test_missing_generator_names_where_it_is_expected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"\.\./shared/bench/fanout\.mjs"):
        copy_without_npm(tmp_path, monkeypatch)


@pytest.mark.parametrize("version", ["1.1.9", "0.9.0"])
def test_generator_older_than_1_2_0_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    with pytest.raises(RuntimeError, match=rf"version {version}; --crosscheck needs 1\.2\.0 or later"):
        copy_without_npm(fake_source(tmp_path / "bench", version), monkeypatch)


def test_versions_compare_as_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fanout, installed = copy_without_npm(fake_source(tmp_path / "bench", "1.10.0"), monkeypatch)
    fanout.remove()
    assert installed == [fanout.dir]
