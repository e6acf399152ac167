"""The shared donor mechanism: files found by path, checked by size and SHA-256 with the install
command in every error, and caches written atomically and never trusted when damaged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from mtlkit.data.donors import Donor, DonorFile, folder_root, load_cache, package_root, save_cache
from mtlkit.errors import DatasetNotAvailableError

INSTALL = "pip install some-donor==1.0"


def donor_with(tmp_path: Path, content: bytes = b"abc") -> tuple[Donor, bytes]:
    (tmp_path / "data.csv").write_bytes(content)
    digest = hashlib.sha256(b"abc").hexdigest()
    return Donor(
        "some-donor", INSTALL, lambda: tmp_path, {"train": DonorFile("data.csv", 3, digest)}
    ), content


def test_a_matching_file_passes_and_a_different_one_names_the_fix(tmp_path: Path) -> None:
    donor, _ = donor_with(tmp_path)
    paths = donor.paths()
    donor.verify(paths)
    (tmp_path / "data.csv").write_bytes(b"abcd")
    with pytest.raises(DatasetNotAvailableError, match=r"4 bytes, expected 3.*pip install some-donor"):
        donor.verify(paths)
    (tmp_path / "data.csv").write_bytes(b"abd")  # same size, other bytes
    donor.verify(paths, checksum=False)
    with pytest.raises(DatasetNotAvailableError, match=r"SHA-256.*pip install some-donor"):
        donor.verify(paths)
    (tmp_path / "data.csv").unlink()
    with pytest.raises(DatasetNotAvailableError, match=r"missing; reinstall with `pip install some-donor"):
        donor.paths()


def test_roots_say_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetNotAvailableError, match="pip install nothing"):
        package_root("a_package_that_is_not_installed", "pip install nothing")()
    assert package_root("mtlkit", "x", "data")().name == "data"  # found without being imported again
    monkeypatch.setenv("SOME_DATA", str(tmp_path))
    assert folder_root(Path("/nonexistent"), "SOME_DATA", "apt-get install x")() == tmp_path
    monkeypatch.delenv("SOME_DATA")
    with pytest.raises(DatasetNotAvailableError, match=r"apt-get install x.*\$SOME_DATA"):
        folder_root(Path("/nonexistent"), "SOME_DATA", "apt-get install x")()


def test_caches_are_atomic_and_a_damaged_one_is_not_trusted(tmp_path: Path) -> None:
    stem = tmp_path / "cache" / "v1-seed0"
    assert load_cache(stem) is None
    save_cache(stem, {"x": torch.arange(4.0)}, {"names": ["a"]})
    tensors, meta = load_cache(stem)  # type: ignore[misc]
    assert torch.equal(tensors["x"], torch.arange(4.0)) and meta == {"names": ["a"]}
    assert not list(stem.parent.glob("*.tmp"))  # no temporary file left behind
    stem.with_suffix(".safetensors").write_bytes(b"truncated")
    assert load_cache(stem) is None
    save_cache(stem, {"x": torch.zeros(2)}, {})
    stem.with_suffix(".json").unlink()  # half a cache is no cache
    assert load_cache(stem) is None


def test_processes_building_the_same_cache_at_once_do_not_collide(tmp_path):
    # suite workers may build one dataset's cache together: private temporary names, last rename wins
    import threading

    import torch

    from mtlkit.data import donors

    stem = tmp_path / "cache" / "v1"
    errors = []

    def build(value: float) -> None:
        try:
            for _ in range(10):
                donors.save_cache(stem, {"x": torch.full((1000,), value)}, {"value": value})
        except Exception as exc:  # pragma: no cover - the failure this test guards against
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(float(v),)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    tensors, _ = donors.load_cache(stem)
    assert tensors["x"].shape == (1000,)
    assert not list(stem.parent.glob("*.tmp"))
