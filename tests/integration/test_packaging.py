"""Installing dssgd must not put `shared`, `worker` or `aggregator` at the top of site-packages.

A data owner's task file often sits beside their own `worker.py` or `shared/`; if dssgd installed
modules under those names, one of the two would silently shadow the other.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("shared", "worker", "aggregator")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a copy of the tracked files so the build leaves nothing in the checkout.
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(src)],
        check=True, capture_output=True,
    )
    (whl,) = out.glob("dssgd-*.whl")
    return whl


def test_wheel_has_only_the_dssgd_package(wheel: Path) -> None:
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"dssgd"}
    names = set(zipfile.ZipFile(wheel).namelist())
    for role in ROLES:
        assert f"dssgd/{role}/__init__.py" in names


@pytest.mark.parametrize("role", ROLES)
def test_installed_roles_live_under_dssgd_only(wheel: Path, tmp_path: Path, role: str) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True,
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    probe = (
        "import importlib.util, sys\n"
        f"print(importlib.util.find_spec({role!r}) is None, "
        f"importlib.util.find_spec('dssgd.{role}') is not None)"
    )
    # -I: no user site, no cwd on the path, so only the installed tree answers.
    res = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r})\n{probe}"],
        cwd=outside, capture_output=True, text=True, check=True,
    )
    assert res.stdout.split() == ["True", "True"], res.stdout + res.stderr
