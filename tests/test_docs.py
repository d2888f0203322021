"""Every Python block of the README and the docs, and every script in examples/, runs
against the bundled server; the examples pass mypy --strict; the site's generated pages
(the CLI reference, llms.txt, the porting tables) are current.

Each README block runs in a fresh interpreter in an empty directory, with
``FRIENDLI_SERVER_URL`` pointing at a `LocalServer`; a block that defines ``test_*``
functions is run with pytest, as the README says to. A block can opt out with the line
``<!-- docs-test: skip (why) -->`` right before its opening fence.
"""

from __future__ import annotations

import argparse
import ast
import http.server
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from friendli_image.server import LocalServer, ServerConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"
TIMEOUT = 120

pytestmark = [
    pytest.mark.subprocess,
    pytest.mark.skipif(not README.is_file(), reason="README.md is not beside the tests"),
]

_SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*(?:\((?P<reason>.*)\))?\s*-->")


class Block(NamedTuple):
    line: int
    code: str
    skip: str | None


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, with the skip reason of each (or None)."""
    blocks = []
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        fence = lines[number].strip()
        if fence.startswith("```") and fence[3:].strip().lower() in {"python", "py"}:
            start = number
            body = []
            number += 1
            while number < len(lines) and not lines[number].strip().startswith("```"):
                body.append(lines[number])
                number += 1
            before = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
            match = _SKIP.search(before)
            skip = (match.group("reason") or "marked skip") if match else None
            blocks.append(Block(start + 1, "\n".join(body) + "\n", skip))
        number += 1
    return blocks


README_BLOCKS = python_blocks(README.read_text(encoding="utf-8")) if README.is_file() else []
DOCS = ROOT / "docs"
#: Every python block of the documentation site's pages, with its page.
SITE_BLOCKS = [
    (page.relative_to(ROOT).as_posix(), block)
    for page in sorted(DOCS.rglob("*.md"))
    for block in python_blocks(page.read_text(encoding="utf-8"))
]


def test_block_parser_reads_fences_and_skip_markers() -> None:
    """The parser finds python blocks only, and the skip marker of the block right after it."""
    text = (
        "intro\n```python\nprint(1)\n```\n\n<!-- docs-test: skip (needs a GPU) -->\n\n"
        "```python\nprint(2)\n```\n```console\n$ ls\n```\n<!-- docs-test: skip -->\n```py\nx\n```\n"
    )
    assert python_blocks(text) == [
        Block(2, "print(1)\n", None),
        Block(8, "print(2)\n", "needs a GPU"),
        Block(15, "x\n", "marked skip"),
    ]


def test_readme_has_python_blocks() -> None:
    """The README still has the code this test runs (so an empty parse cannot pass)."""
    assert len(README_BLOCKS) >= 3


def test_readme_links_work_on_a_package_index() -> None:
    """Every Markdown link is absolute or an in-page anchor: relative links break on PyPI."""
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)", text) + re.findall(r"""(?:src|href)=["']([^"']+)""", text)
    relative = [link for link in links if not re.match(r"(https?://|mailto:|#)", link)]
    assert relative == []


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    """The bundled server with small images, so every block runs in seconds."""
    with LocalServer(ServerConfig(image_size=64, allow_private_urls=True)) as local:
        yield local


def _env(server: LocalServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRIENDLI_")}
    env["FRIENDLI_SERVER_URL"] = server.url
    return env


def _check(done: subprocess.CompletedProcess[str], what: str) -> None:
    output = f"{what}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    assert done.returncode == 0, output
    assert "Traceback" not in done.stderr, output
    assert "ResourceWarning" not in done.stderr, output  # a file or socket left open


#: More runs for a block that Arrow aborted at exit: two aborts in a row were seen once.
ARROW_RERUNS = 3


def _arrow_aborted_at_exit(done: subprocess.CompletedProcess[str]) -> bool:
    """Arrow's known abort at interpreter exit, after the work is done (apache/arrow#34314,
    #39862: a native thread pool torn down while a worker is alive; 3 runs in 90 of a
    pyarrow-only script on a loaded 2-core machine, 1 in 12 of the datasets guide's
    Parquet block). Such a block gets up to ``ARROW_RERUNS`` more runs."""
    return (
        done.returncode == -signal.SIGABRT
        and "terminate called without an active exception" in done.stderr
        and "Traceback" not in done.stderr
    )


def _missing_imports(code: str) -> list[str]:
    """The top-level packages a block imports that are not installed."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return sorted(name for name in names if importlib.util.find_spec(name) is None)


@pytest.mark.parametrize(
    ("page", "block"),
    [("README.md", block) for block in README_BLOCKS] + SITE_BLOCKS,
    ids=[f"README.md:{b.line}" for b in README_BLOCKS] + [f"{p}:{b.line}" for p, b in SITE_BLOCKS],
)
def test_readme_block_runs(page: str, block: Block, server: LocalServer, tmp_path: Path) -> None:
    """The block runs to the end, warning-free (pytest for test functions, else python)."""
    if block.skip is not None:
        pytest.skip(block.skip)
    missing = _missing_imports(block.code)
    if missing:
        # e.g. the dataset readers in `nox -s tests_lowest`, which cannot sit at the floors.
        pytest.skip(f"needs {', '.join(missing)}, not installed here")
    script = tmp_path / ("test_snippet.py" if "def test_" in block.code else "snippet.py")
    script.write_text(block.code, encoding="utf-8")
    if script.name.startswith("test_"):
        # As a user runs it: pytest's own configuration warnings are not the snippet's.
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", script.name]
    else:
        command = [sys.executable, "-W", "error", script.name]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command,
            cwd=tmp_path,
            env=_env(server),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    done = run()
    for _ in range(ARROW_RERUNS):
        if not _arrow_aborted_at_exit(done):
            break
        done = run()
    _check(done, f"{page} line {block.line}")
    if script.name.startswith("test_"):
        assert re.search(r"\b1 passed\b", done.stdout), done.stdout


# -- the documentation site -------------------------------------------------------------------

REFERENCE = DOCS / "reference"
CLI_REFERENCE = REFERENCE / "cli.md"


def cli_reference() -> str:
    """The command-line reference page: every command's ``--help``, as argparse prints it."""
    from friendli_image._cli import build_parser

    parser = build_parser()
    parser.prog = "friendli-image"
    sections = [
        "# Command line\n",
        "Every command of `friendli-image` with its options, as `--help` prints them; "
        "generated from the parser (`tests/test_docs.py` checks it is current, "
        "`nox -s docs` rewrites it).\n",
        f"```text\n{parser.format_help()}```\n",
    ]
    commands = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    for name, sub in commands.choices.items():
        sections.append(f"## `friendli-image {name}`\n\n```text\n{sub.format_help()}```\n")
    return "\n".join(sections)


@pytest.mark.skipif(
    sys.version_info[:2] not in {(3, 11), (3, 12)},
    reason="argparse words its help differently before 3.11 and from 3.13; nox -s docs "
    "writes the page on 3.11",
)
def test_cli_reference_is_current(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/reference/cli.md is what the parser prints (FRIENDLI_UPDATE_DOCS=1 rewrites it)."""
    monkeypatch.setenv("COLUMNS", "100")
    expected = cli_reference()
    _update(CLI_REFERENCE, expected)
    assert CLI_REFERENCE.read_text(encoding="utf-8") == expected


def _update(page: Path, expected: str) -> None:
    """Under FRIENDLI_UPDATE_DOCS=1 (`nox -s docs`), rewrite a generated page that is not
    current. A current page is left alone: CI runs the docs session beside the test
    sessions, whose checks read the same file."""
    stale = not page.exists() or page.read_text(encoding="utf-8") != expected
    if stale and os.environ.get("FRIENDLI_UPDATE_DOCS") == "1":
        page.write_text(expected, encoding="utf-8")


@pytest.fixture(scope="module")
def built_site() -> Path:
    """The documentation site, built as ``nox -s docs`` builds it (strict, no warnings)."""
    pytest.importorskip("zensical", reason="the docs group is not installed (nox -s docs)")
    done = subprocess.run(
        [sys.executable, "-m", "zensical", "build", "--clean"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Zensical reports mkdocstrings' (griffe's) docstring warnings without failing on them.
    assert "griffe:" not in output, output
    assert "WARNING" not in output, output
    return ROOT / "site"


def _inventory(site: Path) -> set[str]:
    """The Python objects the site documents, from its Sphinx inventory (objects.inv)."""
    raw = (site / "objects.inv").read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = raw.index(b"\n", header_end) + 1
    lines = zlib.decompress(raw[header_end:]).decode().splitlines()
    return {line.split(" ", 1)[0] for line in lines if " py:" in line}


PUBLIC_MODULES = (
    "friendli_image",
    "friendli_image.models",
    "friendli_image.ray",
    "friendli_image.server",
    "friendli_image.testing",
    "friendli_image.utils",
)


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_is_in_the_reference(module: str, built_site: Path) -> None:
    """Each name of each public module's ``__all__`` has its entry in the API reference."""
    import importlib

    public = importlib.import_module(module).__all__
    documented = _inventory(built_site)
    missing = [name for name in public if f"{module}.{name}" not in documented]
    assert missing == []


# -- examples/ --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def control_image_url(tiny_png_module: bytes) -> Iterator[str]:
    """A PNG served on loopback, standing in for the internet image of seed_generate.py."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(tiny_png_module)))
            self.end_headers()
            self.wfile.write(tiny_png_module)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture(scope="module")
def tiny_png_module() -> bytes:
    """A 32x32 PNG."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (40, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def _example_args(name: str, tmp_path: Path, control_image_url: str, image: bytes) -> list[str]:
    if name == "async_many.py":
        return [str(tmp_path / "many")]
    if name == "edit_local_file.py":
        (tmp_path / "input.png").write_bytes(image)
        return [str(tmp_path / "input.png"), "make it snow"]
    if name == "seed_generate.py":
        return [control_image_url]
    raise AssertionError(f"examples/{name} is new: add the arguments it needs to this test")


#: Examples that cannot run without arguments, and so must print their usage.
NEEDS_ARGUMENTS = {"edit_local_file.py"}
EXAMPLE_NAMES = sorted(path.name for path in EXAMPLES.glob("*.py")) if EXAMPLES.is_dir() else []


def _run_example(
    name: str, args: list[str], cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="examples/ is not beside the tests")
def test_there_are_examples() -> None:
    """examples/ holds the scripts this test runs."""
    assert len(EXAMPLE_NAMES) >= 3


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_runs_against_the_bundled_server(
    name: str, server: LocalServer, tmp_path: Path, control_image_url: str, tiny_png_module: bytes
) -> None:
    """The example, given its arguments, runs to the end and exits 0."""
    args = _example_args(name, tmp_path, control_image_url, tiny_png_module)
    _check(_run_example(name, args, tmp_path, _env(server)), f"examples/{name} {args}")


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_without_arguments_prints_usage(
    name: str, server: LocalServer, tmp_path: Path
) -> None:
    """``--help`` prints a usage line; an example that needs arguments says so and exits 2."""
    env = _env(server)
    helped = _run_example(name, ["--help"], tmp_path, env)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage:"), helped.stdout
    if name in NEEDS_ARGUMENTS:
        bare = _run_example(name, [], tmp_path, env)
        assert bare.returncode == 2, bare.stderr
        assert bare.stderr.startswith("usage:"), bare.stderr
        assert "Traceback" not in bare.stderr


# -- generated pages: the porting tables and llms.txt ---------------------------------------

PORTING = DOCS / "guides" / "porting.md"


def test_the_porting_guide_shows_the_tables() -> None:
    """The porting guide's tables are ``_compat``'s two tables as rendered."""
    from friendli_image._compat import DIFFERENCES, porting_markdown

    text = PORTING.read_text(encoding="utf-8")
    match = re.search(r"<!-- porting:start -->\n(.*?)\n<!-- porting:end -->", text, re.DOTALL)
    assert match, f"{PORTING} needs the <!-- porting:start --> ... <!-- porting:end --> block"
    assert match.group(1) == porting_markdown(), (
        f"{PORTING}'s porting block is stale; paste friendli_image._compat.porting_markdown()"
    )
    assert len({difference.key for difference in DIFFERENCES}) == len(DIFFERENCES)


LLMS_TXT = DOCS / "llms.txt"


def _summary(page: Path) -> str:
    """The first sentence of a page's first paragraph, as plain text (or "")."""
    paragraph: list[str] = []
    for line in page.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if line[:1].isspace():
            continue  # a directive's options (mkdocstrings' ``:::``)
        if not text:
            if paragraph:
                break
            continue
        if text.startswith(("#", "<!--", "```", "|", "--8<--", ":::", "-", ">")):
            if paragraph:
                break
            continue
        paragraph.append(text)
    plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", " ".join(paragraph)).replace("**", "")
    sentence = re.split(r"(?<=[.:;?])\s", plain, maxsplit=1)[0]
    return sentence.rstrip(":;.") + "." * (not sentence.endswith("?")) if sentence else ""


def llms_txt() -> str:
    """The site's llms.txt (https://llmstxt.org): the nav's pages, each with its first
    sentence, under the nav's sections."""
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    lines = [f"# {config['site_name']}", "", f"> {config['site_description']}", ""]
    lines += [
        "The package is installed from a checkout (`pip install '.[all]'`); `friendli-image "
        "serve` starts the bundled server the examples talk to.",
        "",
    ]

    def entry(title: str, path: str) -> str:
        url = path.removesuffix("index.md") if path.endswith("index.md") else f"{path[:-3]}/"
        summary = _summary(DOCS / path)
        return f"- [{title}]({url or './'})" + (f": {summary}" if summary else "")

    # Pages before the first section start the file; the ones after it are optional.
    sections: list[str] = []
    start: list[str] = []
    loose: list[str] = []
    for item in config["nav"]:
        ((title, value),) = item.items()
        if isinstance(value, str):
            (loose if sections else start).append(entry(title, value))
        else:
            sections += [f"## {title}", "", *(entry(*child.popitem()) for child in value), ""]
    lines += ["## Start here", "", *start, "", *sections, "## Optional", "", *loose, ""]
    return "\n".join(lines)


def test_llms_txt_is_current() -> None:
    """docs/llms.txt lists the nav's pages (FRIENDLI_UPDATE_DOCS=1 rewrites it); the site
    publishes it at its root."""
    pytest.importorskip("yaml")
    expected = llms_txt()
    _update(LLMS_TXT, expected)
    assert LLMS_TXT.read_text(encoding="utf-8") == expected
    nav_pages = re.findall(r"\]\(([^)]+)\)", expected)
    assert len(nav_pages) >= 20


def test_the_site_publishes_llms_txt(built_site: Path) -> None:
    """llms.txt is at the site's root, and every page it links to was built."""
    published = (built_site / "llms.txt").read_text(encoding="utf-8")
    assert published == LLMS_TXT.read_text(encoding="utf-8")
    for url in re.findall(r"\]\(([^)]+)\)", published):
        assert (built_site / url / "index.html").is_file(), url


def test_the_site_expands_every_snippet(built_site: Path) -> None:
    """No page shows a snippet line (``--8<--``) instead of the file it includes: a
    formatter that rewrote one in a code block would leave it so."""
    shown = [
        page.relative_to(built_site).as_posix()
        for page in built_site.rglob("*.html")
        if "--8&lt;--" in page.read_text(encoding="utf-8")
        or '<span class="mi">8</span> <span class="o">&lt;</span>'
        in page.read_text(encoding="utf-8")
    ]
    assert shown == []


# -- the examples type-check -------------------------------------------------------------------

#: mypy settings for the examples: strict, as a user's project with strict settings checks
#: them; the untyped third-party packages are the project's own list (pyproject.toml).
_MYPY_CONFIG = """\
[mypy]
strict = True
python_version = 3.10
warn_unreachable = True

[mypy-aioresponses.*,tqdm.*,ray.*,pyarrow.*,fsspec.*,datasets.*,webdataset.*]
ignore_missing_imports = True
"""


@pytest.mark.long
@pytest.mark.subprocess
def test_the_examples_pass_mypy_strict(tmp_path: Path) -> None:
    """Every README and docs block that the tests run, and the recipes, pass mypy --strict."""
    pytest.importorskip("mypy")
    blocks = [("README.md", block) for block in README_BLOCKS] + SITE_BLOCKS
    files = []
    for page, block in blocks:
        if block.skip is not None or _missing_imports(block.code):
            continue
        name = re.sub(r"\W", "_", f"{page}_{block.line}").lower()
        path = tmp_path / f"{name}.py"
        path.write_text(block.code, encoding="utf-8")
        files.append(str(path))
    assert len(files) >= 10
    recipes = sorted(str(path) for path in (EXAMPLES / "recipes").rglob("*.py"))
    config = tmp_path / "mypy.ini"
    config.write_text(_MYPY_CONFIG, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), *files, *recipes],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
