"""Plugins: user modules that register methods or masks, loaded before planning (and in every worker).

Two ways in: the config key ``plugins`` (module names, or paths to ``.py`` files), and installed packages'
entry points of the groups ``attnbench.methods`` and ``attnbench.masks``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

ENTRY_POINT_GROUPS = ("attnbench.methods", "attnbench.masks")


class PluginError(ImportError):
    def __init__(self, plugin: str, message: str):
        super().__init__(f"config field 'plugins': {plugin!r}: {message}")


def _import_path(path: Path):
    name = f"attnbench_plugin_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(str(path), "not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def resolve_plugin_paths(plugins) -> list:
    """Plugin file paths made absolute against the directory the user ran from (workers get these)."""
    return [str(Path(p).expanduser().resolve()) if isinstance(p, str) and (p.endswith(".py") or "/" in p) else p
            for p in plugins or ()]


def load_plugins(plugins=()) -> list[str]:
    """Import the built-ins, entry points and ``plugins``; returns what was loaded. Errors name the plugin."""
    from attnbench import masks  # noqa: F401
    from attnbench import methods  # noqa: F401

    loaded = []
    for group in ENTRY_POINT_GROUPS:
        for entry in importlib.metadata.entry_points(group=group):
            try:
                entry.load()
            except Exception as exc:
                raise PluginError(f"{group}:{entry.name}", f"{type(exc).__name__}: {exc}") from exc
            loaded.append(f"{group}:{entry.name}")
    for plugin in plugins or ():
        if not isinstance(plugin, str) or not plugin:
            raise PluginError(str(plugin), "expected a module name or a path to a .py file")
        try:
            if plugin.endswith(".py") or "/" in plugin:
                path = Path(plugin).expanduser().resolve()
                if not path.is_file():
                    raise PluginError(plugin, f"no such file {path}")
                _import_path(path)
            else:
                importlib.import_module(plugin)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(plugin, f"import failed: {type(exc).__name__}: {exc}") from exc
        loaded.append(plugin)
    return loaded
