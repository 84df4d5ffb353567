"""A minimal writer of Fiddle's JSON serialisation format (``fiddle._src.experimental.serialization``, version 0.0.1).

NeMo 2 stores a checkpoint's trainer context as ``context/io.json``: the Fiddle ``Config`` graph that rebuilds the
model, its config and its tokenizer (``nemo.lightning.io.load_context``). This module writes that format without
importing Fiddle or NeMo, from the facts of the format:

- the document is ``{"root": VALUE, "objects": {NAME: OBJECT}, "refcounts": {NAME: n}, "version": "0.0.1"}``;
- a value is a ``{"type": "leaf", "value": v}`` primitive, a ``{"type": "pyref", "module": m, "name": n}`` reference
  to a Python object (a class, a function, ``torch.float32``), or a ``{"type": "ref", "key": NAME}`` to an object;
- an object (a ``Config``, a dict, a list, a non-empty tuple) is ``{"type": PYREF-OF-ITS-TYPE, "items": [[PATH-ELEMENT,
  VALUE], ...], "metadata": VALUE}``, named ``<snake_case_type>_<n>``; a ``Config``'s metadata is a
  ``BuildableTraverserMetadata`` object (the callable, the argument names, empty tags and history), a dict's the
  tuple of its keys; values reachable from the root carry ``"paths"`` (``<root>.model.config``), metadata does not;
- NeMo's ``load_context(..., subpath="model.tokenizer")`` picks the object whose ``paths`` contain
  ``<root>.model.tokenizer`` as the root, so every object must carry its paths.

Objects appear after everything they refer to, as Fiddle writes them. ``tests/integration/test_nemo_oracle.py`` reads
the output with NeMo 2.7.3 itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

VERSION = "0.0.1"


@dataclass(frozen=True)
class PyRef:
    """A Python object referred to by module and name (a class, a function, a dtype)."""

    module: str
    name: str


@dataclass
class Config:
    """``fdl.Config(module.name, **arguments)``: building it calls the callable with the arguments."""

    module: str
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


_PYREF = {"type": "pyref"}
_FIDDLE_CONFIG = PyRef("fiddle._src.config", "Config")
_METADATA = PyRef("fiddle._src.config", "BuildableTraverserMetadata")


def _pyref(ref: PyRef) -> dict[str, str]:
    return {**_PYREF, "module": ref.module, "name": ref.name}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class _Writer:
    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def _add(self, type_name: str, obj: dict[str, Any]) -> dict[str, str]:
        base = _snake(type_name)
        self.counts[base] = self.counts.get(base, 0) + 1
        name = f"{base}_{self.counts[base]}"
        self.objects[name] = obj
        return {"type": "ref", "key": name}

    def _tuple(self, items: tuple) -> Any:
        body = {"type": _pyref(PyRef("builtins", "tuple")), "items": [[f"Index(index={i})", v] for i, v in
                                                                        enumerate(items)], "metadata": None}
        return self._add("tuple", body) if items else body  # Fiddle inlines the (unmemoised) empty tuple

    def _empty_dict(self) -> dict[str, str]:
        return self._add("dict", {"type": _pyref(PyRef("builtins", "dict")), "items": [],
                                  "metadata": self._tuple(())})

    def value(self, value: Any, path: str) -> Any:
        if isinstance(value, PyRef):
            return {**_pyref(value), "paths": [path]}
        if isinstance(value, Config):
            items = [[f"Attr(name={key!r})", self.value(child, f"{path}.{key}")]
                     for key, child in value.arguments.items()]
            metadata = self._add("BuildableTraverserMetadata", {
                "type": _pyref(_METADATA),
                "items": [["Attr(name='fn_or_cls')", _pyref(PyRef(value.module, value.name))],
                          ["Attr(name='argument_names')", self._tuple(tuple(value.arguments))],
                          ["Attr(name='argument_tags')", self._empty_dict()],
                          ["Attr(name='argument_history')", self._empty_dict()]],
                "metadata": _pyref(_METADATA)})
            return self._add(value.name, {"type": _pyref(_FIDDLE_CONFIG), "items": items, "metadata": metadata,
                                          "paths": [path]})
        if isinstance(value, dict):
            items = [[f"Key(key={key!r})", self.value(child, f"{path}[{key!r}]")] for key, child in value.items()]
            return self._add("dict", {"type": _pyref(PyRef("builtins", "dict")), "items": items,
                                      "metadata": self._tuple(tuple(value)), "paths": [path]})
        if isinstance(value, (list, tuple)):
            kind = "list" if isinstance(value, list) else "tuple"
            items = [[f"Index(index={i})", self.value(child, f"{path}[{i}]")] for i, child in enumerate(value)]
            return self._add(kind, {"type": _pyref(PyRef("builtins", kind)), "items": items, "metadata": None,
                                    "paths": [path]})
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"type": "leaf", "value": value, "paths": [path]}
        raise TypeError(f"{path}: cannot serialise {type(value).__name__} {value!r}")


def dumps(root: Config) -> str:
    """The Fiddle JSON document of ``root`` (each object referenced once: a tree, not a shared graph)."""
    writer = _Writer()
    root_value = writer.value(root, "<root>")
    return json.dumps({"root": root_value, "objects": writer.objects,
                       "refcounts": {name: 1 for name in writer.objects}, "version": VERSION})
