"""Path templates: config values that name the folders of the `paths` section as {work_dir},
{models_dir}, {data_dir}, {cache_dir} or {runs_dir} (``{{`` and ``}}`` for literal braces).

Checked when the config loads, so an unknown placeholder, a stray brace or a folder defined
through itself is a config error naming the key, never a KeyError when a path is first used.
"""
from __future__ import annotations

from string import Formatter
from typing import Annotated

from pydantic import AfterValidator

FOLDERS = ("work_dir", "models_dir", "data_dir", "cache_dir", "runs_dir")
KNOWN = ", ".join("{" + name + "}" for name in FOLDERS)


def pieces(template: str) -> list[tuple[str, str | None]]:
    """(literal text, folder name or None) in order; ValueError says what is wrong."""
    try:
        parsed = list(Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{template!r} is not a path template ({exc}; write {{{{ or }}}} for a brace)") from None
    out = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (name not in FOLDERS or spec or conversion):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"{template!r}: unknown placeholder {shown}; known: {KNOWN}")
        out.append((literal, name))
    return out


def expand(template: str, folders: dict[str, str], through: tuple[str, ...] = ()) -> str:
    """``template`` with each placeholder replaced by its folder, itself expanded."""
    out = []
    for literal, name in pieces(template):
        out.append(literal)
        if name is None:
            continue
        if name in through:
            chain = " -> ".join(f"paths.{n}" for n in (*through, name))
            raise ValueError(f"paths.{through[0]} is defined through itself ({chain})")
        out.append(expand(folders[name], folders, (*through, name)))
    return "".join(out)


def _checked(template: str) -> str:
    pieces(template)
    return template


PathTemplate = Annotated[str, AfterValidator(_checked)]
"""A str config value that may hold path placeholders."""
