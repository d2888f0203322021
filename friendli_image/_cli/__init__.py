"""The ``friendli-image`` command: generate, edit, batch, gallery, serve and demo.

Exit status: 0 success; 1 the server refused or failed the request; 2 bad arguments;
3 the server could not be reached (connection refused, timeout); 130 interrupted.
Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from friendli_image._client import AsyncFriendli
from friendli_image._exceptions import (
    FriendliConnectionError,
    FriendliError,
    FriendliUsageError,
)
from friendli_image._formats import FORMATS_BY_EXTENSION
from friendli_image._gallery import write_gallery
from friendli_image._results import ImageResult, save_target
from friendli_image._version import __version__

from ._batch import add_batch_command
from ._options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    add_client_options,
    make_client,
)

__all__ = ["SERVER_TOKEN_ENV", "build_parser", "main", "run"]

#: The environment variable ``serve`` reads the token to require from, when it is set.
SERVER_TOKEN_ENV = "FRIENDLI_SERVER_TOKEN"  # noqa: S105  (a variable name, not a secret)

DEMO_PROMPTS = (
    ("lighthouse", "a lighthouse on a cliff at dawn, warm light over a calm sea", 7),
    ("mountains", "snowy mountains under a starry night sky", 21),
    ("desert", "sand dunes in a desert at sunset with a lone cactus", 42),
    ("forest", "a misty pine forest by a lake in the morning", 1234),
)
DEMO_EDIT_PROMPT = "make it snow at night"


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="FILE",
        help="file to write; its extension picks the format (.jpg, .png, .webp, ...: "
        "converted with Pillow when it differs from --format), none adds the format's",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="an int in [0, 2**32-1] for a reproducible image"
    )
    parser.add_argument("--steps", type=int, default=20, help="inference steps, 1-50 (20)")
    parser.add_argument(
        "--guidance", type=float, default=0.0, help="guidance scale (0: the model chooses)"
    )
    parser.add_argument(
        "--format",
        choices=("jpeg", "raw"),
        default=None,
        dest="response_format",
        help="what the server sends: jpeg (the default) or raw, a lossless PNG",
    )
    parser.add_argument("--model", default=None, help="adapter route")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``friendli-image`` (subcommands register themselves here)."""
    parser = argparse.ArgumentParser(
        prog="friendli-image",
        description="Generate and edit images with a Friendli Container server.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"friendli-image {__version__}",
        help="print the version and exit",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate an image from a prompt")
    generate.add_argument("prompt", help="what the image should show")
    _add_generation_options(generate)
    generate.add_argument(
        "--control",
        action="append",
        default=None,
        metavar="IMAGE",
        help="ControlNet image (path or URL); repeat for several",
    )
    generate.add_argument(
        "--control-weight",
        action="append",
        type=float,
        default=None,
        metavar="W",
        help="weight in [0, 1] per --control image",
    )
    add_client_options(generate)
    generate.set_defaults(run=_run_generate)

    edit = commands.add_parser("edit", help="edit one or more images as a prompt says")
    edit.add_argument("images", nargs="+", metavar="IMAGE", help="path or URL of an image")
    edit.add_argument("-p", "--prompt", required=True, help="the change to make")
    _add_generation_options(edit)
    add_client_options(edit)
    edit.set_defaults(run=_run_edit)

    add_batch_command(commands)

    gallery = commands.add_parser(
        "gallery",
        help="write OUT_DIR/index.html, a page of the images of a batch",
        description="Write OUT_DIR/index.html: a thumbnail per item of OUT_DIR/manifest.jsonl, "
        "in input order, with a filter box; it opens from disk, without network.",
    )
    gallery.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="a batch's --out-dir")
    gallery.add_argument("--title", default=None, help="the page title (default: the folder)")
    gallery.set_defaults(run=_run_gallery)

    serve = commands.add_parser("serve", help="run the bundled Friendli-compatible server")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (8000)")
    token = serve.add_mutually_exclusive_group()
    token.add_argument(
        "--token",
        default=None,
        help="require this bearer token (visible in the process list: prefer --token-file "
        f"or ${SERVER_TOKEN_ENV})",
    )
    token.add_argument(
        "--token-file", type=Path, default=None, help="require the bearer token in this file"
    )
    token.add_argument(
        "--token-env",
        default=None,
        metavar="NAME",
        help=f"require the bearer token in this environment variable (default: "
        f"${SERVER_TOKEN_ENV} when it is set)",
    )
    serve.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="fetch image URLs on loopback and private addresses (off: such URLs get a 422)",
    )
    serve.add_argument(
        "--step-latency-ms",
        type=float,
        default=0.0,
        help="simulated GPU time per inference step (0: answer at once)",
    )
    serve.add_argument("--max-concurrency", type=int, default=4, help="simulated GPU slots")
    serve.add_argument(
        "--image-size", type=int, default=512, help="width and height of the images, in pixels"
    )
    serve.set_defaults(run=_run_serve)

    demo = commands.add_parser(
        "demo", help="start the bundled server, generate and edit a few images, save them"
    )
    demo.add_argument(
        "--out-dir",
        type=Path,
        default=Path("demo-output"),
        help="where the images go (default: demo-output)",
    )
    demo.add_argument(
        "--step-latency-ms",
        type=float,
        default=15.0,
        help="simulated GPU time per step (default 15: a 20-step image takes 0.3 s)",
    )
    demo.set_defaults(run=_run_demo)
    for name, command in commands.choices.items():
        command.set_defaults(command_parser=command, command=name)
    return parser


def _report(result: ImageResult, path: Path) -> None:
    """One line on stdout: the file, the format really written, size and timing."""
    written = FORMATS_BY_EXTENSION.get(path.suffix.lower(), result.format)
    converted = "" if written == result.format else f", converted from {result.format}"
    size = f"{result.width}x{result.height} " if result.width else ""
    print(
        f"wrote {path} ({written} {size}{path.stat().st_size:,} bytes{converted}, "
        f"{result.elapsed:.2f}s, {result.attempts} attempt(s))"
    )


def _check_output(args: argparse.Namespace) -> None:
    """Refuse an -o the image cannot be saved to before the request is sent."""
    save_target(args.output, "png" if args.response_format == "raw" else "jpeg")


async def _run_generate(args: argparse.Namespace) -> int:
    _check_output(args)
    async with make_client(args) as client:
        result = await client.container.image.generate(
            prompt=args.prompt,
            model=args.model,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            response_format=args.response_format,
            control_images=args.control,
            controlnet_weights=args.control_weight,
        )
    _report(result, result.save(args.output))
    return EXIT_OK


async def _run_edit(args: argparse.Namespace) -> int:
    images: list[Any] = [
        image if image.startswith(("http://", "https://")) else Path(image) for image in args.images
    ]
    _check_output(args)
    async with make_client(args) as client:
        result = await client.container.image.edit(
            image=images if len(images) > 1 else images[0],
            prompt=args.prompt,
            model=args.model,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            response_format=args.response_format,
        )
    _report(result, result.save(args.output))
    return EXIT_OK


def _server_modules() -> Any:
    try:
        from friendli_image import server  # noqa: PLC0415  (needs the optional Pillow dependency)
    except ImportError:
        raise FriendliUsageError(
            "the bundled server needs Pillow: pip install 'friendli-image[server]'"
        ) from None
    return server


def _run_gallery(args: argparse.Namespace) -> int:
    page = write_gallery(args.out_dir, title=args.title)
    print(f"wrote {page}")
    return EXIT_OK


def _run_serve(args: argparse.Namespace) -> int:
    server = _server_modules()
    token_env = args.token_env
    if token_env is None and args.token is None and args.token_file is None:
        token_env = SERVER_TOKEN_ENV if os.environ.get(SERVER_TOKEN_ENV) else None
    try:
        config = server.ServerConfig(
            token=args.token,
            token_file=args.token_file,
            token_env=token_env,
            step_latency_ms=args.step_latency_ms,
            max_concurrency=args.max_concurrency,
            image_size=args.image_size,
            allow_private_urls=args.allow_private_urls,
        )
        config.resolve_token()  # a missing token file fails here, before listening
    except ValueError as exc:
        raise FriendliUsageError(f"cannot start the server: {exc}") from None
    server.run_server(config, host=args.host, port=args.port)
    return EXIT_OK


_T = TypeVar("_T")

#: Python 3.11's `asyncio.run` turns the first Ctrl-C into a cancel of its task.
_RUN_CANCELS_ON_SIGINT = sys.version_info >= (3, 11)


def _run_async(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """`asyncio.run`, with Ctrl-C handled as Python 3.11's runner does, on 3.10 too: the
    first cancels the command's task, whose cleanup runs (a batch writes what finished
    and closes its store), then KeyboardInterrupt is raised; a second Ctrl-C raises it
    at once. Python 3.10's default handler raises it inside whatever runs, asyncio's
    own bookkeeping included, which can leave the loop unable to finish: the command
    then hangs instead of exiting (bpo-39622; seen in CI, 1 run in 13 under load)."""
    if (
        _RUN_CANCELS_ON_SIGINT
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        return asyncio.run(coroutine)
    interrupts = 0

    async def cancelled_by_ctrl_c() -> _T:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def on_sigint(_signum: int, _frame: object) -> None:
            nonlocal interrupts
            interrupts += 1
            if interrupts > 1 or task is None or task.done():
                raise KeyboardInterrupt
            task.cancel()
            loop.call_soon_threadsafe(lambda: None)  # wakes a loop waiting in select()

        signal.signal(signal.SIGINT, on_sigint)
        return await coroutine

    try:
        return asyncio.run(cancelled_by_ctrl_c())
    except asyncio.CancelledError:
        if interrupts:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _run_demo(args: argparse.Namespace) -> int:
    out_dir: Path = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    return _run_async(_demo(out_dir, args.step_latency_ms))


async def _demo(out_dir: Path, step_latency_ms: float) -> int:
    server = _server_modules()
    config = server.ServerConfig(step_latency_ms=step_latency_ms, max_concurrency=2)
    started = time.monotonic()
    async with server.LocalServer(config) as local, AsyncFriendli(server_url=local.url) as client:
        print(f"bundled server listening on {local.url}")
        image = client.container.image
        results = await asyncio.gather(
            *(
                image.generate(prompt=prompt, seed=seed, num_inference_steps=20)
                for _name, prompt, seed in DEMO_PROMPTS
            )
        )
        for (name, _prompt, _seed), result in zip(DEMO_PROMPTS, results, strict=True):
            _report(result, result.save(out_dir / name))
        source = out_dir / (DEMO_PROMPTS[0][0] + ".jpg")
        edited = await image.edit(image=source, prompt=DEMO_EDIT_PROMPT, seed=3)
        _report(edited, edited.save(out_dir / f"{DEMO_PROMPTS[0][0]}-edited"))
    print(
        f"done: {len(results) + 1} images in {time.monotonic() - started:.1f}s, saved in {out_dir}"
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse reports a subcommand's unknown flag with the top-level usage; the
        # subcommand's own usage is the one that lists what it takes.
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        outcome = args.run(args)
        if asyncio.iscoroutine(outcome):
            outcome = _run_async(outcome)
        return int(outcome)
    except KeyboardInterrupt:
        print("friendli-image: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FriendliUsageError as exc:  # includes FriendliValidationError
        print(f"friendli-image: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FriendliConnectionError as exc:
        print(f"friendli-image: cannot reach the server: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except FriendliError as exc:
        print(f"friendli-image: request failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"friendli-image: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def run() -> NoReturn:
    """The ``friendli-image`` command as a process: `main`, then exit with its status.

    A run that loaded pyarrow (a Parquet output, ``batch --ray``) exits without the
    interpreter's teardown, once its output is flushed and its files are closed: there
    Arrow can abort a finished process (apache/arrow#34314, a native thread pool torn
    down with a worker alive), and a job runner would read a complete run's exit status
    as 134.
    """
    status = main()
    if "pyarrow" in sys.modules:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":  # pragma: no cover
    run()
