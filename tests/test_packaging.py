"""The built wheel: one `fleetlearn` namespace, nothing else top-level, and it imports installed.

Builds the wheel from a copy of this checkout (so the checkout gets no build/ of its own; no
network: the build backend is the one installed here),
installs it without dependencies into a fresh virtualenv that borrows this environment's
third-party libraries through a path entry, and imports it there from a directory that is not
the checkout, with `-I` so neither the checkout nor PYTHONPATH can stand in for the wheel.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("shared", "transport", "aggregator", "device", "broker", "firmware_sim", "dashboard")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("source") / "fleetlearn"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,  # fleetlearn/<side> stay links, as in a clone
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", "tests", "bench", "docs"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=out,
    )
    (built,) = out.glob("fleetlearn-*.whl")
    return built


def test_wheel_holds_only_the_fleetlearn_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"fleetlearn", next(t for t in tops if t.endswith(".dist-info"))}
    for side in SIDES:
        assert f"fleetlearn/{side}/__init__.py" in names  # the files, not the links
    assert "fleetlearn/shared/wire/__init__.py" in names  # subpackages are found too
    # setuptools never deletes from a build/ directory: building in a checkout that has one, a
    # module that was moved or removed would still ship, registering its message tags twice.
    stale = [n for n in names if n.endswith(".py") and not (ROOT / n).exists()]
    assert not stale, f"not in the checkout (rm -rf build/ and rebuild): {stale}"
    assert "fleetlearn/aggregator/models/pdm_default.tflite" in names
    # The dashboard's page and its vendored chart library (served by the app, never a CDN).
    for asset in ("index.html", "dashboard.js", "dashboard.css", "uPlot.iife.min.js",
                  "uPlot.min.css", "uPlot.LICENSE.txt"):  # fmt: skip
        assert f"fleetlearn/dashboard/static/{asset}" in names, asset
    assert not any(n.split("/")[0] in SIDES for n in names)
    assert not any("/tests/" in n or n.startswith(("tests/", "bench/")) for n in names)


def test_installed_wheel_imports_as_fleetlearn_only(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # numpy, msgpack, nacl... from this environment: a plain path entry, so its .pth files
    # (among them the editable install of this checkout) are not run.
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()

    def run(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python, "-I", "-c", code],
            check=False,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = run(
        "import fleetlearn.shared.wire as w, fleetlearn.transport, fleetlearn.device.participant;"
        "print(w.__file__)"
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().startswith(str(site))
    for side in SIDES:
        failed = run(f"import {side}")
        assert failed.returncode != 0
        assert "ModuleNotFoundError" in failed.stderr
    cli = subprocess.run(
        [env_dir / "bin" / "python", "-I", "-m", "fleetlearn", "--help"],
        check=False,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert "aggregator" in cli.stdout
    assert "dashboard" in cli.stdout
    # The installed dashboard finds its page in the wheel, not in this checkout.
    page = run(
        "from fleetlearn.dashboard.app import STATIC;"
        "print(STATIC, (STATIC / 'index.html').is_file())"
    )
    assert page.returncode == 0, page.stderr
    assert page.stdout.strip() == f"{site / 'fleetlearn' / 'dashboard' / 'static'} True"
