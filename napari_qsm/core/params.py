"""Parameter records: one dataclass per method feeds the API, the command line and the widget.

Declare fields with :func:`param`::

    @dataclass
    class TKDParams:
        threshold: float = param(0.15, "k-space threshold δ on |D|", min=0.01, max=0.67)

Metadata carried per field: ``doc`` (one line), ``min``/``max`` (inclusive), ``choices``,
``cli`` (the command-line / display name when it differs from the attribute, e.g. ``lambda``),
``allow`` (extra string values accepted besides numbers, e.g. ``("auto",)``), ``widget``
(hint for the GUI: "hidden" hides it, "advanced" puts it under Advanced) and ``short`` (the symbol a
person writes in a result's name, e.g. ``δ`` for the TKD threshold: "TKD δ=0.2").
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any


class ParamError(ValueError):
    """A parameter value is unknown, malformed or out of range."""


def param(default: Any, doc: str, *, min: float | None = None, max: float | None = None,
          choices: tuple | None = None, cli: str | None = None, allow: tuple = (),
          widget: str | None = None, short: str | None = None, aliases: dict | None = None):
    """A dataclass field with the metadata the API, CLI and GUI share.

    ``aliases`` maps other spellings (strings, compared case-insensitively, or ``True``/``False``) to a value of
    ``choices``: e.g. a former bool parameter that became a tri-state choice keeps accepting true/false.
    """
    meta = {"doc": doc, "min": min, "max": max, "choices": choices, "cli": cli,
            "allow": tuple(allow), "widget": widget, "short": short,
            "aliases": tuple((aliases or {}).items())}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class ParamSpec:
    """Description of one parameter (what a widget or the CLI help needs)."""

    attr: str          # attribute name on the dataclass
    name: str          # public name (CLI --param NAME=..., widget label)
    type: Any          # python type (float, int, bool, str)
    default: Any
    doc: str
    min: float | None
    max: float | None
    choices: tuple | None
    allow: tuple
    widget: str | None
    short: str | None = None   # symbol in result names ("δ", "λ"); None: the public name
    aliases: tuple = ()        # ((other spelling, value), ...): see :func:`param`


def _base_type(tp: Any) -> Any:
    if isinstance(tp, str):
        tp = {"float": float, "int": int, "bool": bool, "str": str}.get(tp.split("|")[0].strip(), str)
    origin = typing.get_origin(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if args else str
    return tp


def specs(cls) -> list[ParamSpec]:
    """The :class:`ParamSpec` of every field of a parameter record class."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        m = f.metadata
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        out.append(ParamSpec(attr=f.name, name=m.get("cli") or f.name, type=_base_type(hints[f.name]),
                             default=default, doc=m.get("doc", ""), min=m.get("min"), max=m.get("max"),
                             choices=m.get("choices"), allow=tuple(m.get("allow", ())),
                             widget=m.get("widget"), short=m.get("short"), aliases=tuple(m.get("aliases", ()))))
    return out


#: the spellings a bool parameter accepts
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
#: aliases of a tri-state "auto"/"on"/"off" choice that was a bool parameter: true/false spellings mean on/off
ON_OFF_ALIASES = {**{k: "on" for k in _TRUE}, **{k: "off" for k in _FALSE}, True: "on", False: "off"}


def _convert(spec: ParamSpec, value: Any) -> Any:
    if spec.aliases:
        key = value.strip().lower() if isinstance(value, str) else value
        for alias, target in spec.aliases:
            if type(alias) is type(key) and alias == key:
                return target
    if isinstance(value, str):
        v = value.strip()
        if v.lower() in [a.lower() for a in spec.allow]:
            return v.lower()
        if spec.type is bool:
            if v.lower() in _TRUE:
                return True
            if v.lower() in _FALSE:
                return False
            raise ParamError(f"parameter '{spec.name}': expected true/false, got {value!r}")
        if spec.type in (int, float):
            try:
                num = float(v)
            except ValueError:
                extra = f" or one of {list(spec.allow)}" if spec.allow else ""
                raise ParamError(f"parameter '{spec.name}': expected a number{extra}, got {value!r}") from None
            if spec.type is int:
                if num != int(num):
                    raise ParamError(f"parameter '{spec.name}': expected an integer, got {value!r}")
                num = int(num)
            value = num
        else:
            value = v
    if spec.type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    if spec.type is int and isinstance(value, float) and value == int(value):
        value = int(value)
    return value


def validate_value(spec: ParamSpec, value: Any) -> Any:
    value = _convert(spec, value)
    if isinstance(value, str) and value in spec.allow:
        return value
    if spec.choices is not None and value not in spec.choices:
        raise ParamError(f"parameter '{spec.name}': {value!r} is not one of {list(spec.choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value:  # NaN
            raise ParamError(f"parameter '{spec.name}': NaN is not allowed")
        if spec.min is not None and value < spec.min:
            raise ParamError(f"parameter '{spec.name}': {value} is below the minimum {spec.min}")
        if spec.max is not None and value > spec.max:
            raise ParamError(f"parameter '{spec.name}': {value} is above the maximum {spec.max}")
    return value


def make_params(cls, values: dict | None = None, **kwargs):
    """Build and validate a parameter record from public names or attribute names.

    Values may be strings (from the command line) or python values. Unknown names raise
    :class:`ParamError` listing the known ones.
    """
    merged = dict(values or {})
    merged.update(kwargs)
    by_name = {}
    for s in specs(cls):
        by_name[s.name] = s
        by_name[s.attr] = s
    init = {}
    for key, val in merged.items():
        if key not in by_name:
            known = ", ".join(s.name for s in specs(cls))
            raise ParamError(f"unknown parameter '{key}' for {cls.__name__} (known: {known})")
        s = by_name[key]
        init[s.attr] = validate_value(s, val)
    return cls(**init)


def check_params(obj) -> None:
    """Validate every field of an existing record (raises :class:`ParamError`)."""
    for s in specs(type(obj)):
        validate_value(s, getattr(obj, s.attr))


def params_to_dict(obj) -> dict:
    """Public-name dict of a record (JSON friendly)."""
    out = {}
    for s in specs(type(obj)):
        v = getattr(obj, s.attr)
        if isinstance(v, tuple):
            v = list(v)
        out[s.name] = v
    return out


def parse_cli_params(items: list[str] | None) -> dict:
    """``["threshold=0.2", "lambda=auto"]`` -> ``{"threshold": "0.2", "lambda": "auto"}``."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ParamError(f"--param expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt(x) for x in v)
    return str(v)


def changed_params(obj) -> list[tuple[ParamSpec, Any]]:
    """(spec, value) of the fields of a record that differ from their defaults, in declaration order."""
    out = []
    for s in specs(type(obj)):
        v = getattr(obj, s.attr)
        d = list(s.default) if isinstance(s.default, tuple) else s.default
        if (list(v) if isinstance(v, tuple) else v) != d:
            out.append((s, v))
    return out


def display_name(label: str, obj, shown: tuple = ()) -> str:
    """A name a person would write: ``label`` formatted with the record's values (``"{steps} steps"``),
    then every other parameter that differs from its default, e.g. ``"TKD δ=0.2"``, ``"MEDI λ=1000"``.
    Parameters hidden from the GUI, and those declared with ``short=""`` (display settings such as a preview
    interval), are left out."""
    values = {s.attr: _fmt(getattr(obj, s.attr)) for s in specs(type(obj))}
    values.update({s.name: values[s.attr] for s in specs(type(obj))})
    title = label.format(**values) if "{" in label else label
    bits = [f"{s.short or s.name}={_fmt(v)}" for s, v in changed_params(obj)
            if s.widget != "hidden" and s.short != "" and "{" + s.attr + "}" not in label and "{" + s.name + "}" not in label
            and s.attr not in shown]
    return " ".join([title] + bits) if bits else title
