"""Development tasks: `nox -s tests`, `nox -s lint`, `nox -s typecheck`, `nox -s demo`, ...

`nox -l` lists every session. The test session runs on every supported Python that is
installed (3.10-3.13), including pyenv-managed ones that are not on PATH.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
SUPPORTED = ("3.10", "3.11", "3.12", "3.13")

# pip (through virtualenv) honours the machine's pip configuration (index, CA bundle);
# uv reads neither, so it is not used even when installed.
nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_venv = "yes"


def _works(executable: str) -> bool:
    try:
        return (
            subprocess.run(
                [executable, "-c", ""], check=False, capture_output=True, timeout=30
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def _find_pythons() -> list[str]:
    """Supported versions that run here; pyenv versions are put on PATH for nox to find."""
    found = []
    for version in SUPPORTED:
        on_path = shutil.which(f"python{version}")
        if on_path and _works(on_path):
            found.append(version)
            continue
        pattern = os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")
        for candidate in sorted(glob.glob(pattern), reverse=True):
            if _works(candidate):
                os.environ["PATH"] = f"{Path(candidate).parent}{os.pathsep}{os.environ['PATH']}"
                found.append(version)
                break
    current = f"{sys.version_info.major}.{sys.version_info.minor}"
    return found or [current]


PYTHONS = _find_pythons()
DEFAULT_PYTHON = "3.11" if "3.11" in PYTHONS else PYTHONS[-1]


def _install_for_tests(session: nox.Session) -> None:
    session.install("-e", ".[all]", *nox.project.dependency_groups(PYPROJECT, "test"))


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite (unit tests and tests against the bundled server)."""
    _install_for_tests(session)
    session.run("pytest", *session.posargs)


@nox.session(python=DEFAULT_PYTHON)
def reliability(session: nox.Session) -> None:
    """Run the fault suite (tests/reliability) and write docs/reliability.md from its figures."""
    _install_for_tests(session)
    report = ROOT / "docs" / "reliability.md"
    server_figures = Path(session.create_tmp()) / "server-figures.jsonl"
    server_figures.unlink(missing_ok=True)
    session.run(
        "pytest",
        "tests/reliability",
        # Scenarios 19-24: the blocking facade's lifecycle.
        "tests/test_sync.py",
        "tests/test_sync_lifecycle.py",
        # The bundled server's own figures (slowloris, the fd limit, a 20 M-item body).
        "tests/server/test_server_connections.py",
        "tests/server/test_server_hardening.py::test_20m_integer_body_is_refused_without_a_memory_spike",
        "tests/server/test_server_hardening.py::test_private_targets_are_refused_alike_open_or_closed",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={
            "FRIENDLI_RELIABILITY_REPORT": str(report),
            "FRIENDLI_SERVER_FIGURES": str(server_figures),
        },
    )
    session.log(f"wrote {report}")


@nox.session(python=DEFAULT_PYTHON)
def ray(session: nox.Session) -> None:
    """The Ray Data stage on a local Ray cluster (tests/ray_stage; friendli-image[ray]).

    Where Ray cannot be installed (no wheel for this platform or Python), the tests that
    need it skip with that reason; the stage's own tests still run.
    """
    session.install("-e", ".[all]", *nox.project.dependency_groups(PYPROJECT, "test"))
    try:
        session.install("-e", ".[all,ray]", "s3fs", "moto[server]", "dask[dataframe]", silent=True)
    except nox.command.CommandFailed:
        session.warn("could not install Ray (friendli-image[ray]); its tests will skip")
    session.run("pytest", "tests/ray_stage", "-p", "no:cacheprovider", *session.posargs)


@nox.session(python=DEFAULT_PYTHON)
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=DEFAULT_PYTHON)
def typecheck(session: nox.Session) -> None:
    """Type-check the package with mypy --strict."""
    session.install("-e", ".[all]", *nox.project.dependency_groups(PYPROJECT, "typecheck"))
    session.run("mypy")


@nox.session(python=DEFAULT_PYTHON)
def demo(session: nox.Session) -> None:
    """The main job: start the bundled server, generate and edit images, save them."""
    session.install(".[all]")
    session.run("friendli-image", "demo", "--out-dir", str(ROOT / "demo-output"), *session.posargs)


@nox.session(python=DEFAULT_PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmark against expert and naive aiohttp and the official SDK (benchmarks/RESULTS.md)."""
    session.install("-e", ".", "friendli==0.16.3", "matplotlib")
    session.run("python", "benchmarks/run.py", "--command", "nox -s bench", *session.posargs)


#: Stoplight Prism, the validating proxy of the contract session (npm's @stoplight/prism-cli).
PRISM_PACKAGE = "@stoplight/prism-cli@5.14.2"
MIN_NODE = 18


def _node_major() -> int | None:
    try:
        version = subprocess.run(
            ["node", "--version"], check=True, capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        return int(version.strip().lstrip("v").split(".")[0])
    except ValueError:
        return None


@nox.session(python=DEFAULT_PYTHON)
def contract(session: nox.Session) -> None:
    """The SDK and the bundled server against the OpenAPI file: Prism and schemathesis.

    Installs Stoplight Prism with npm into this session's folder (under .nox, not
    globally) and schemathesis (pinned in the ``contract`` dependency group), then runs
    tests/contract. Needs Node.js 18+ and npm; without them the session fails.
    """
    npm = shutil.which("npm")
    node = _node_major()
    if npm is None or node is None or node < MIN_NODE:
        found = "no npm" if npm is None else f"node {node}" if node else "no node"
        session.error(
            f"nox -s contract needs Node.js {MIN_NODE}+ and npm to install Stoplight Prism "
            f"({found} on PATH): install Node.js, then run it again"
        )
    _install_for_tests(session)
    session.install(*nox.project.dependency_groups(PYPROJECT, "contract"))
    prefix = Path(session.virtualenv.location) / "prism"
    prism = prefix / "node_modules" / ".bin" / "prism"
    marker = prefix / "installed.txt"
    if not prism.exists() or not marker.exists() or marker.read_text() != PRISM_PACKAGE:
        session.run(
            npm,
            "install",
            "--prefix",
            str(prefix),
            "--no-audit",
            "--no-fund",
            "--loglevel",
            "error",
            PRISM_PACKAGE,
            external=True,
        )
        marker.write_text(PRISM_PACKAGE)
    session.run(
        "pytest",
        "tests/contract",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={"FRIENDLI_PRISM": str(prism)},
    )


@nox.session(python=DEFAULT_PYTHON)
def official(session: nox.Session) -> None:
    """Official-SDK compatibility: the bundled server, and the differential suite.

    The differential suite runs each program of tests/official/programs twice, with the
    official friendli SDK and with only its imports rewritten to friendli_image, and
    compares what it prints, the files it writes and its exit status. The generative
    harness (tests/official/test_generative.py) runs 500 drawn calls through both SDKs
    with a fixed seed (``FRIENDLI_GENERATIVE=long nox -s official`` draws 2,000 at
    random); the surface test holds the official package's names to _compat's table.
    """
    _install_for_tests(session)
    session.install("friendli==0.16.3")
    session.run(
        "pytest",
        "tests/server/test_official_sdk.py",
        "tests/official",
        "-p",
        "no:cacheprovider",
        *session.posargs,
    )
