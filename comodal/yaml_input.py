"""Reading YAML safely: one message per problem, no key given twice, and a bound on what a
document may expand to (nested aliases would otherwise exhaust memory), with error messages
that echo at most a short excerpt of a value."""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml

from comodal.errors import ConfigError

MAX_VALUES = 100_000  # values a YAML document may hold once its aliases are followed


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping and a document whose aliases
    expand past ``MAX_VALUES`` values (a YAML "billion laughs" would exhaust memory later)."""

    source = "YAML"

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _expanded_size(node, self.source, {}, set())
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first:
                    raise ConfigError(f"{self.source}, line {line}: key {shown(key.value)} is "
                                      "given twice in one mapping (first on line "
                                      f"{first[key.tag, key.value]}); keep one")
                first[key.tag, key.value] = line
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, source: str, sizes: dict[int, int], open_: set[int]) -> int:
    """Values under ``node`` with every alias followed, computed once per node."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise ConfigError(f"{source}, line {node.start_mark.line + 1}: a YAML alias refers to "
                          "a value that contains it")
    open_.add(id(node))
    children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
    size = 1 + sum(_expanded_size(child, source, sizes, open_) for child in children)
    if size > MAX_VALUES:
        raise ConfigError(f"{source}: expands to more than {MAX_VALUES} values once its YAML "
                          "aliases are followed (nested aliases?); write the values out")
    open_.discard(id(node))
    sizes[id(node)] = size
    return size


def parse_yaml(text: str, source: str) -> Any:
    """``text`` parsed as YAML (safe, bounded, no duplicate keys); a problem is one
    ``ConfigError`` line naming ``source`` (a file or an override) and the line."""
    loader = _Loader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = err.problem or err.context
        raise ConfigError(f"{source}{where}: not valid YAML: {problem}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {shown(str(err))}") from err
    except RecursionError as err:
        raise ConfigError(f"{source}: nested too deeply to be a config") from err
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The YAML file at ``path`` parsed by ``parse_yaml``; a missing file, a directory or an
    unreadable one is a ``ConfigError`` naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a directory; give the path of a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {err}") from err
    return parse_yaml(text, f"{what} {str(path)!r}")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 120, 120


def shown(value: Any, limit: int = 200) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters (and cheap to
    compute, however large the value)."""
    text = repr(value[:limit]) if isinstance(value, str) else _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def config_diff(old: str, new: str, limit: int = 10) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs between two resolved
    configs given as YAML text (as ``identity`` writes them); at most ``limit`` lines."""
    before, after = flatten(yaml.safe_load(old) or {}), flatten(yaml.safe_load(new) or {})
    lines = [f"{key}: {_show(before, key)} -> {_show(after, key)}"
             for key in sorted(before.keys() | after.keys())
             if key not in before or key not in after or before[key] != after[key]]
    return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping's leaves by dotted key (an empty mapping is a leaf)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(flat: dict[str, Any], key: str) -> str:
    """The value at ``key`` as the YAML a ``--set`` would take, or ``(unset)``."""
    if key not in flat:
        return "(unset)"
    text = yaml.safe_dump(flat[key], default_flow_style=True, width=1 << 16)
    return text.removesuffix("\n...\n").strip()
