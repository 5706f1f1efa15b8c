"""`flowad validate` on a folder that holds no class: an error saying what it expected, what it
found, and which folder was probably meant."""

from __future__ import annotations

from pathlib import Path

from harness.cli import main


def _class(root: Path, name: str) -> None:
    (root / name / "train" / "good").mkdir(parents=True)
    (root / name / "test" / "good").mkdir(parents=True)


def test_validate_on_a_folder_without_classes_says_what_it_found(tmp_path: Path, capsys) -> None:
    parent = tmp_path / "datasets"
    _class(parent / "mvtec_ad", "bottle")
    assert main(["validate", str(parent)]) == 2
    error = capsys.readouterr().err
    assert "holds no class folder" in error and "parent of a dataset" in error
    assert f"flowad validate {parent / 'mvtec_ad'}" in error

    assert main(["validate", str(parent / "mvtec_ad" / "bottle")]) == 2
    assert f"--classes bottle" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["validate", str(empty)]) == 2
    assert "it is empty" in capsys.readouterr().err

    runs = tmp_path / "runs"
    (runs / "main").mkdir(parents=True)
    assert main(["validate", str(runs)]) == 2
    assert "training runs" in capsys.readouterr().err
