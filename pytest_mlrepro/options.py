"""pytest's side of the option table: marker > command line > environment (MLREPRO_*) > ini (mlrepro_*) > default.

The options themselves (names, defaults, checks) are defined once, in :mod:`pytest_mlrepro.config`.
Kept free of torch so the plugin can load it eagerly.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

from .config import AUDIT_OPTIONS, BY_NAME_AUDIT, TEXT_OPTIONS, AuditConfig, Option, Resolved, resolve_text, split
from .errors import ConfigError

MARKER_ALLOWED = frozenset(BY_NAME_AUDIT) | {"target"}


def add_pytest_options(group: Any, addini: Callable[..., None]) -> None:
    """Every text option as ``--mlrepro-<name>`` (dest ``mlrepro_<name>``) and ini ``mlrepro_<name>``."""
    for o in TEXT_OPTIONS:
        choices = f" ({', '.join(o.choices)})" if o.choices else ""
        text = f"{o.help}{choices}. Env MLREPRO_{o.name.upper()}, ini mlrepro_{o.name}. Default: {o.default!r}"
        text = text.replace("%", "%%")  # argparse %-formats help texts ("2 % of the step time")
        if o.switch:
            group.addoption("--mlrepro-" + o.flag, dest=f"mlrepro_{o.name}", action="store_const", const="true",
                            default=None, help=text)
        elif o.repeat:  # a list of texts; the option's check joins them
            group.addoption("--mlrepro-" + o.flag, dest=f"mlrepro_{o.name}", action="append", default=None,
                            metavar=o.name.upper(), help=text)
        else:
            group.addoption("--mlrepro-" + o.flag, dest=f"mlrepro_{o.name}", default=None, metavar=o.name.upper(),
                            help=text)
        addini(f"mlrepro_{o.name}", help=f"pytest-mlrepro: {o.help}", default=None)


def resolve(getoption: Callable[[str], Any], getini: Callable[[str], Any], environ: Optional[Mapping] = None) -> Resolved:
    """Build the validated configs from pytest's command line, the environment and the ini file."""
    environ = os.environ if environ is None else environ

    def lookup(option: Option):
        raw = getoption(f"mlrepro_{option.name}")
        if raw is not None:
            return raw, "command line"
        env = f"MLREPRO_{option.name.upper()}"
        if environ.get(env, "") != "":
            return environ[env], env
        ini = getini(f"mlrepro_{option.name}")
        if ini not in (None, "", []):
            return (ini if isinstance(ini, str) else ",".join(ini)), f"ini mlrepro_{option.name}"
        return None, "default"

    values, sources = resolve_text(lookup)
    try:
        audit, session = split(values)
    except ConfigError as exc:  # a combination of options, each fine on its own
        raise ConfigError(f"mlrepro options: {exc}") from None
    return Resolved(enabled=bool(getoption("mlrepro")), audit=audit, session=session, sources=sources)


def with_marker(config: AuditConfig, marker_kwargs: Mapping[str, Any]) -> AuditConfig:
    """The test's audit config: the session's, with the marker's keywords on top (validated)."""
    return config.merged({k: v for k, v in marker_kwargs.items() if k != "target"}, what="mlrepro marker keyword")


__all__ = ["AUDIT_OPTIONS", "MARKER_ALLOWED", "add_pytest_options", "resolve", "with_marker"]
