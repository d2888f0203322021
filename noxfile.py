"""Development tasks: `nox -s tests`, `nox -s lint`, `nox -s typecheck`, `nox -s demo`, ...

`nox -l` lists every session. The test session runs on every supported Python that is
installed (3.10-3.13), including pyenv-managed ones that are not on PATH.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
SUPPORTED = ("3.10", "3.11", "3.12", "3.13")

# uv when it is installed (`pip install nox uv`): it builds a session's environment in
# seconds where pip takes a minute, and CI builds ten of them. It uses the Pythons found
# below, never one of its own downloads; `nox -db virtualenv` goes back to pip.
nox.options.default_venv_backend = "uv|virtualenv"
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
# The sessions start hundreds of Python processes (pytest's workers, servers, the CLI,
# scripts, Ray's workers). uv installs no bytecode, and with PYTHONDONTWRITEBYTECODE set
# none is ever cached, so each process compiled every module it imported again: pytest's
# collection alone took 18 s of CPU instead of 4. The bytecode goes to __pycache__ folders
# under .nox and the checkout, which git and the package builds ignore.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
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


#: The mypy checks of tests/typing: run once, by the typecheck session.
TYPING_TESTS = "tests/test_typing.py"

#: The store's state machines run their full derandomized budget (100 examples, a minute
#: of CPU) on the default Python; the other Pythons and the floors run a fifth of it,
#: derandomized too: what they check is that the same code holds on another interpreter.
QUICK_STATES = {"FRIENDLI_STATE_EXAMPLES": "20"}
#: The documentation site's code blocks are `nox -s docs`'s (it builds the site and runs
#: them); the README's blocks run in every test session.
SITE_BLOCKS = "not docs/"
#: What the other Pythons and the floors leave to the default Python's tests session:
#: the examples under mypy --strict (a type check, not a run) and the gallery's page in
#: headless Chromium (the browser runs the same page whatever Python wrote it; the
#: page's contents are checked on every Python).
ONCE = f"{SITE_BLOCKS} and not test_the_examples_pass_mypy_strict and not headless_chromium"


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite: the fast tests on every Python, the slow ones once.

    The fast tests run in parallel over the machine's cores (pytest-xdist); the slow
    scenarios (long fault runs, memory ceilings, the benchmark smoke run) run on the
    default Python only, one at a time, since they measure what the machine does; the
    store's state machines run their full budget there too (a fifth elsewhere), and
    the examples' mypy check and the browser test run there only. The documentation
    site's blocks are the docs session's and the mypy checks of tests/typing the
    typecheck session's. Arguments after ``--`` go to pytest instead (one plain run).
    """
    _install_for_tests(session)
    if session.posargs:
        session.run("pytest", *session.posargs)
        return
    if session.python == DEFAULT_PYTHON:
        session.run(
            "pytest", "-n", "auto", "-m", "not slow", f"--ignore={TYPING_TESTS}", "-k", SITE_BLOCKS
        )  # fmt: skip
        session.run("pytest", "-m", "slow", f"--ignore={TYPING_TESTS}", "--durations=10")
    else:
        session.run(
            "pytest", "-n", "auto", "-m", "not slow", f"--ignore={TYPING_TESTS}", "-k", ONCE,
            env=QUICK_STATES,
        )  # fmt: skip


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
        # Scenarios 49-50: a location planted with links and hostile manifests; crashes
        # and reruns of an edited input (state machines).
        "tests/test_store.py",
        "tests/test_store_states.py",
        "tests/test_directory_states.py",
        # Scenario 5's retry spacing, computed.
        "tests/test_retry.py",
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
    session.run(
        "pytest", "tests/ray_stage", "-p", "no:cacheprovider", "--durations=10", *session.posargs
    )  # fmt: skip


@nox.session(python=DEFAULT_PYTHON)
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=DEFAULT_PYTHON)
def typecheck(session: nox.Session) -> None:
    """Type-check the package with mypy --strict, and the typed delegation (tests/typing)."""
    session.install("-e", ".[all]", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.install(*nox.project.dependency_groups(PYPROJECT, "typecheck"))
    session.run("mypy")
    session.run("pytest", TYPING_TESTS, "-p", "no:cacheprovider")


@nox.session(python=DEFAULT_PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/ (Zensical, strict), and check it.

    Rewrites docs/reference/cli.md from the parser and docs/llms.txt from the nav first,
    then runs the checks of tests/test_docs.py that need the site: every public name in
    the API reference, llms.txt published at its root, the porting tables current, and
    every Python block of its pages against the bundled server.
    """
    session.install("-e", ".[all]", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.install(*nox.project.dependency_groups(PYPROJECT, "docs"))
    session.run(
        "pytest",
        "tests/test_docs.py",
        "-k",
        "cli_reference or llms or reference or porting or snippet or docs/",
        "-p",
        "no:cacheprovider",
        env={"FRIENDLI_UPDATE_DOCS": "1"},
    )
    session.log(f"built {ROOT / 'site' / 'index.html'}")


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
    # Over the machine's cores: each differential program runs both SDKs in processes of
    # their own, so one worker mostly waits on them while the generative harness runs.
    session.run(
        "pytest",
        "tests/server/test_official_sdk.py",
        "tests/official",
        "-p",
        "no:cacheprovider",
        *(session.posargs or ["-n", "auto"]),
    )


def _floors(requirements: list[str]) -> dict[str, str]:
    """Each requirement's floor (its ``>=`` bound) by project name; a requirement named
    twice (Pillow in several extras) takes the higher floor, the lowest both allow."""
    floors: dict[str, str] = {}
    for text in requirements:
        requirement = Requirement(text)
        bounds = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if len(bounds) != 1:
            raise ValueError(f"{text!r} in pyproject.toml states no single >= floor; add one")
        name = canonicalize_name(requirement.name)
        if name not in floors or Version(bounds[0]) > Version(floors[name]):
            floors[name] = bounds[0]
    return floors


#: What `nox -s tests_lowest` pins to its floor: the runtime dependencies and the extra
#: the test sessions install (`.[all]`).
LOWEST = _floors(
    [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["all"]]
)
#: The lowest Python that requires-python allows: the floors' oldest wheels are built for it.
LOWEST_PYTHON = _floors([f"python{PYPROJECT['project']['requires-python']}"])["python"]


#: Test tools that cannot be installed beside the floors.
DATASET_READERS = frozenset({"datasets", "webdataset", "pyarrow"})


@nox.session(python=LOWEST_PYTHON)
def tests_lowest(session: nox.Session) -> None:
    """The suite with every runtime dependency at the lowest version pyproject.toml allows.

    The floors (and the Pillow and tqdm of the ``all`` extra) are read from
    pyproject.toml and pinned with ``==`` in a pip constraints file; the test tools
    resolve freely. Without arguments it runs what ``tests`` runs on every Python: the
    fast tests over the machine's cores (not the slow scenarios, not tests/typing).
    """
    constraints = Path(session.create_tmp()) / "lowest-constraints.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in LOWEST.items()))
    # The dataset readers (datasets needs tqdm>=4.66.3, above the floor) are left out:
    # tests/test_datasets.py, which reads the formats back with them, skips without them.
    tools = [
        requirement
        for requirement in nox.project.dependency_groups(PYPROJECT, "test")
        if Requirement(requirement).name not in DATASET_READERS
    ]
    session.install("-c", str(constraints), "-e", ".[all]", *tools)
    installed = json.loads(
        session.run(
            "python",
            "-c",
            "import importlib.metadata as m, json, sys\n"
            "print(json.dumps({name: m.version(name) for name in sys.argv[1:]}))",
            *LOWEST,
            silent=True,
        )
    )
    for name, version in installed.items():
        session.log(f"{name}=={version}")
    off = [
        f"{name} {installed[name]}"
        for name in LOWEST
        if Version(installed[name]) != Version(LOWEST[name])
    ]
    if off:
        session.error(f"pip installed above the floor: {', '.join(off)}")
    default = ["-n", "auto", "-m", "not slow", f"--ignore={TYPING_TESTS}", "-k", ONCE]
    session.run("pytest", *(session.posargs or default), "-p", "no:cacheprovider", env=QUICK_STATES)
