"""The public namespace: a sorted, complete, documented ``__all__`` and nothing else."""

from __future__ import annotations

import importlib.metadata
import inspect
import types

import friendli_image
from friendli_image import _exceptions


def test_all_is_sorted_and_unique() -> None:
    """__all__ is sorted and has no duplicates (so additions merge cleanly)."""
    assert friendli_image.__all__ == sorted(friendli_image.__all__)
    assert len(set(friendli_image.__all__)) == len(friendli_image.__all__)


def test_every_name_in_all_exists() -> None:
    """Every name in __all__ is importable from the package."""
    missing = [name for name in friendli_image.__all__ if not hasattr(friendli_image, name)]
    assert missing == []


def test_star_import_gives_exactly_all() -> None:
    """``from friendli_image import *`` binds exactly the names of __all__."""
    namespace: dict[str, object] = {}
    exec("from friendli_image import *", namespace)  # noqa: S102  (a fixed statement)
    namespace.pop("__builtins__", None)
    assert sorted(namespace) == sorted(friendli_image.__all__)


def test_public_classes_and_functions_have_docstrings() -> None:
    """Every exported class or function, and their public methods, has a docstring."""
    undocumented = []
    for name in friendli_image.__all__:
        value = getattr(friendli_image, name)
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            continue
        if not inspect.getdoc(value) or value.__doc__ is None:
            undocumented.append(name)
        if inspect.isclass(value) and value.__module__.startswith("friendli_image"):
            for attr, member in vars(value).items():
                if attr.startswith("_"):
                    continue
                if (
                    inspect.isfunction(member) or isinstance(member, property | classmethod)
                ) and not inspect.getdoc(member):
                    undocumented.append(f"{name}.{attr}")
    assert undocumented == []


def test_nothing_private_is_reexported_by_accident() -> None:
    """Every public attribute of the package (other than subpackages) is listed in __all__."""
    public = {
        name
        for name, value in vars(friendli_image).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - set(friendli_image.__all__) == set()


def test_api_aliases_are_the_same_classes() -> None:
    """The API* names are aliases of the Friendli* classes, so either catches the same errors."""
    assert friendli_image.APIConnectionError is friendli_image.FriendliConnectionError
    assert friendli_image.APITimeoutError is friendli_image.FriendliTimeoutError
    assert friendli_image.APIStatusError is friendli_image.FriendliAPIStatusError
    assert friendli_image.ResponseError is friendli_image.FriendliResponseError
    assert friendli_image.ContainerImageGenerateSuccess is friendli_image.ImageResult


def test_every_error_class_is_exported() -> None:
    """Each class of the error tree can be caught by its public name."""
    classes = {
        name
        for name, value in vars(_exceptions).items()
        if inspect.isclass(value) and issubclass(value, friendli_image.FriendliError)
    }
    assert classes <= set(friendli_image.__all__)
    for name in classes:
        assert getattr(friendli_image, name) is getattr(_exceptions, name)


def test_version_matches_the_distribution() -> None:
    """__version__ is the installed distribution's version."""
    assert friendli_image.__version__ == importlib.metadata.version("friendli-image")
