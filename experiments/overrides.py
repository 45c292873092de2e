"""Command-line overrides checked before Hydra composes them, each reason in one line.

Hydra reports an unknown key, a group a command does not have, or a value of the wrong type
(``rounds=abc``) under a stack of context lines, after the command has started. The commands
(``experiments.train``, ``.evaluate``, ``.score``, ``.benchmark``, ``.planted``) check here first.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def one_line(e: BaseException) -> str:
    """Hydra's or OmegaConf's reason and its cause, first lines only."""
    return ": ".join(str(x).splitlines()[0] for x in (e, e.__cause__) if x is not None and str(x))


def field_error(arg: str, schema, command: str) -> str | None:
    """``key=value`` against a flat config dataclass (the benchmark's, the planted study's): an
    unknown key, a training config group among them, named in one line; None otherwise."""
    if "=" not in arg or arg.startswith("-"):
        return None
    key = arg.lstrip("+~").partition("=")[0]
    if key.startswith(("hydra.", "hydra/")):
        return None
    names = [f.name for f in dataclasses.fields(schema)]
    return None if key in names else f"unknown key '{key}'; {command} takes: {', '.join(names)}"


def first_error(config_name: str, overrides: list[str], check) -> str | None:
    """The first reason ``check(override)`` gives for one of ``overrides``; if every override passes,
    ``compose_error``'s."""
    for arg in overrides:
        if (msg := check(arg)) is not None:
            return msg
    return compose_error(config_name, overrides)


def compose_error(config_name: str, overrides: list[str]) -> str | None:
    """Why ``overrides`` do not compose with ``conf/<config_name>.yaml`` (a value of the wrong
    type, say), in one line; None if they do. Its schema must be in the ConfigStore already.
    Hydra's own settings are left to Hydra, and a sweep (``-m a=1,2``) is not one config."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    mine = [o for o in overrides if "=" in o and not o.startswith("-")
            and not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name=config_name, overrides=mine)
    except (HydraException, OmegaConfBaseException) as e:
        return one_line(e)
    return None
