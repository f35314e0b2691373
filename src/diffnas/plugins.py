"""Your own components from Python, named in the config: ``plugins: [my_data, ./my_ops.py]``.

A plugin is a module that registers datasets, ops, spaces or strategies with the usual
decorators when it is imported. Naming it in the config (instead of importing it in a
wrapper script) means every process that reads the config imports it too: ``--seeds``
workers, ``--resume``, every rank under torchrun, ``diffnas train --dry-run`` and the
reports. An entry is either a module name (looked up on ``sys.path``, then in the current
directory) or the path of a ``.py`` file (made absolute when the config is read, so a run
resumed from another directory still finds it).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import sysconfig
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from diffnas.config import ConfigError
from diffnas.registry import registrations_undone_on_error

_PACKAGE = Path(__file__).resolve().parent  # diffnas's own source files
#: the Python library and installed packages (torch): code a plugin calls, not its own
_LIBRARY = {Path(sysconfig.get_paths()[k]).resolve()
            for k in ("stdlib", "platstdlib", "purelib", "platlib")}


def is_file_plugin(entry: str) -> bool:
    """A path to a Python file (``x.py``, or anything with a slash) rather than a module."""
    return entry.endswith(".py") or "/" in entry or "\\" in entry


def absolute_plugins(entries: Sequence[str]) -> list[str]:
    """File entries made absolute (relative to the current directory); modules kept."""
    return [str(Path(e).expanduser().resolve()) if is_file_plugin(e) else e for e in entries]


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"config.plugins: {str(path)!r} is not a file")
    resolved = path.resolve()
    imported = _imported_from(resolved)
    if imported is not None:  # already imported (as a plugin, or by a plugin beside it):
        return imported       # registering twice would be an error
    # imported under its own name, so that a plugin beside it that imports it (``from
    # my_ops import ...``) gets this module rather than running the file a second time;
    # under a name made of its path when that name is taken
    name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else \
        "diffnas_plugin_" + "".join(c if c.isalnum() else "_" for c in str(resolved))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config.plugins: cannot import {str(path)!r} (not a Python file)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # its own folder on the path, as running the file as a script would put it, so it can
    # import the modules beside it whatever the current directory
    folder = str(path.resolve().parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        if added:
            sys.path.remove(folder)
        raise
    return module


def _imported_from(path: Path) -> ModuleType | None:
    """The module already imported from the file ``path`` (resolved), if any."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and file.endswith(path.name) and Path(file).resolve() == path:
            return module
    return None


def _import_module(name: str) -> ModuleType:
    top, cwd = name.split(".")[0], str(Path.cwd())
    added = False
    while True:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != top:  # the plugin itself imports something missing
                raise
            if not added and cwd not in sys.path:  # `diffnas` (a console script) skips it
                sys.path.insert(0, cwd)
                added = True
                continue
            if added:
                sys.path.remove(cwd)
            raise ConfigError(f"config.plugins: no module named {name!r} on the Python path "
                              f"or in {cwd}; name an importable module or a .py file") from None


def import_plugins(entries: Sequence[str]) -> list[ModuleType]:
    """Import each plugin once (a second call is free). An error raised inside a plugin
    propagates with the plugin's name and the file and line it was raised at added (the
    command line prints the message alone); what the plugin registered before failing is
    unregistered, so it can be fixed and imported again."""
    modules = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"config.plugins: {entry!r} is not a module name or file path")
        try:
            with registrations_undone_on_error():
                modules.append(_import_file(Path(entry)) if is_file_plugin(entry)
                               else _import_module(entry))
        except ConfigError:
            raise
        except SystemExit as exc:  # would end the command silently, maybe with status 0
            raise ConfigError(f"config.plugins: importing {entry!r} called sys.exit"
                              f"({exc.code!r}); a plugin should register components, not "
                              "end the program") from exc
        except Exception as exc:
            raise ConfigError(f"config.plugins: importing {entry!r} failed: "
                              f"{type(exc).__name__}: {exc}{_where(exc)}") from exc
    return modules


def plugin_sources(entries: Sequence[str]) -> dict[str, dict[str, str]]:
    """What each (imported) plugin's code is: ``{entry: {"file", "sha256"}}`` of its source
    file, recorded in a run (``plugins.json``) so that a resume or report can say when a
    plugin was edited since the run computed with it."""
    out = {}
    for entry, module in zip(entries, import_plugins(entries), strict=True):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and Path(file).is_file():
            digest = hashlib.sha256(Path(file).read_bytes()).hexdigest()
            out[entry] = {"file": str(Path(file).resolve()), "sha256": digest}
    return out


def changed_plugins(recorded: dict[str, dict[str, str]], now: dict[str, dict[str, str]]
                    ) -> list[str]:
    """The recorded plugin files whose code differs now (matched by entry, else by file
    name, so a plugin that moved is compared with its new place)."""
    by_name = {Path(v["file"]).name: v for v in now.values()}
    changed = []
    for entry, rec in recorded.items():
        cur = now.get(entry) or by_name.get(Path(rec.get("file", "")).name)
        if cur is not None and cur.get("sha256") != rec.get("sha256"):
            changed.append(cur["file"])
    return changed


def _where(exc: BaseException) -> str:
    """`` (at FILE:LINE)``: where a plugin's import failed. A syntax error is at the line
    it names (the plugin never ran); otherwise the innermost frame of the plugin's own
    code: its file (the first module body run outside diffnas) or a module of its own,
    not diffnas's (a duplicate name fails in registry.py) nor the Python library's or an
    installed package's (a dataclass field without a default fails in dataclasses.py, a
    bad layer in torch)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" (at {exc.filename}:{exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<")]  # not importlib's own frames
    own = [f for f in frames if not _inside(f.filename, _PACKAGE)]
    top = next((f.filename for f in own if f.name == "<module>"), None)
    mine = [f for f in own if f.filename == top
            or not any(_inside(f.filename, lib) for lib in _LIBRARY)]
    at = (mine or own or frames)[-1:]
    return f" (at {at[0].filename}:{at[0].lineno})" if at else ""


def _inside(file: str, folder: Path) -> bool:
    """Whether ``file`` lies in ``folder`` (or below)."""
    return Path(file).resolve().is_relative_to(folder)
