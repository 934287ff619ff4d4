"""Each setting written once: a config dataclass's field carries its help, its valid values and
whether it may change on --resume, and everything else is derived from it.

    lr: float = setting(1e-3, "peak learning rate", above=0)

`validate(self)` in the dataclass's __post_init__ checks every field against its metadata (type
from the annotation, choices, bounds); `resumable(cls)` is the set a resumed run may change;
`add_arguments` makes the argparse flags (type, choices, help ending with the default), and
`given` reads back the ones a user gave. Library errors name fields (`lr=-1.0 is invalid`); a
SettingError knows which, so the command line can name its flags instead (`--lr=-1.0 is invalid`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any, Callable, Mapping

from build_llm.errors import UsageError, UsageTypeError

# One help for every --device (the default, "auto", is each verb's).
DEVICES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"


class SettingError(UsageError):
    """A config's bad value. The message names fields; `fields` lists them, for `with_flags`."""

    def __init__(self, owner: str, text: str, fields: tuple[str, ...]) -> None:
        super().__init__(f"{owner}: {text}")
        self.owner, self.text, self.fields = owner, text, fields

    def with_flags(self, flags: Mapping[str, str]) -> str:
        """The message with each field that has a flag named as the flag (`lr=` -> `--lr=`)."""
        if not any(f in flags for f in self.fields):
            return str(self)
        text = self.text
        for name in self.fields:
            if name in flags:
                text = re.sub(rf"(?<![\w-]){re.escape(name)}(?!\w)", flags[name], text)
        return text


def setting(default: Any = dataclasses.MISSING, help: str = "", *, resumable: bool = False,
            internal: bool = False, choices: tuple | None = None, at_least: float | None = None,
            above: float | None = None, at_most: float | None = None, below: float | None = None,
            expected: str | None = None, unset: str | None = None, flag: str | None = None,
            group: str | None = None) -> Any:
    """A dataclass field with its metadata.

    resumable: a resumed run may change it.  internal: no command-line flag.
    choices / at_least / above / at_most / below: the valid values (checked by `validate`).
    expected: says what is valid, where the generated words would not (e.g. a device's forms).
    unset: what None means, shown as the flag's default (e.g. "each epoch").
    flag: the flag's name if not --field-name.  group: the --help section, if not the verb's main one.
    """
    meta = dict(help=help, resumable=resumable, internal=internal, choices=choices, at_least=at_least,
                above=above, at_most=at_most, below=below, expected=expected, unset=unset, flag=flag, group=group)
    return dataclasses.field(default=default, metadata=meta)


def resumable(cls: type) -> frozenset[str]:
    """The fields a resumed run may change (the rest must match the checkpoint)."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable"))


def internal(cls: type) -> frozenset[str]:
    """The fields with no command-line flag."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("internal"))


# --- what a field's annotation says ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Kind:
    """A field's type: base (int, float, bool, str or tuple), whether None is allowed, and for a
    tuple its items' type and length (None: any length)."""
    base: type
    optional: bool = False
    item: type | None = None
    length: int | None = None


def kind_of(annotation: Any) -> Kind:
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional, annotation = len(args) < len(typing.get_args(annotation)), args[0]
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return Kind(tuple, optional, args[0], None)
        return Kind(tuple, optional, args[0], len(args))
    return Kind(annotation, optional)


@functools.cache
def specs(cls: type) -> tuple[tuple[dataclasses.Field, Kind], ...]:
    """Each field of a config dataclass with its Kind (annotations resolved once per class)."""
    hints = typing.get_type_hints(cls)
    return tuple((f, kind_of(hints[f.name])) for f in dataclasses.fields(cls))


# --- validation ----------------------------------------------------------------------------------
def _bounds(meta: Mapping[str, Any]) -> str:
    lo = ("[", meta["at_least"]) if meta["at_least"] is not None else ("(", meta["above"])
    hi = ("]", meta["at_most"]) if meta["at_most"] is not None else (")", meta["below"])
    if lo[1] is not None and hi[1] is not None:
        return f" in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo[1] is not None:
        return f" {'>=' if lo[0] == '[' else '>'} {lo[1]:g}"
    if hi[1] is not None:
        return f" {'<=' if hi[0] == ']' else '<'} {hi[1]:g}"
    return ""


def _in_bounds(value: float, meta: Mapping[str, Any]) -> bool:
    return ((meta["at_least"] is None or value >= meta["at_least"]) and (meta["above"] is None or value > meta["above"])
            and (meta["at_most"] is None or value <= meta["at_most"]) and (meta["below"] is None or value < meta["below"]))


def expected(meta: Mapping[str, Any], kind: Kind, sep: str = "") -> str:
    """What a field accepts, in words: "an integer >= 1", "a number in [0, 1)", "one of (...)";
    `sep` goes before a tuple's items ("two comma-separated numbers")."""
    if meta["expected"]:
        text = meta["expected"]
    elif kind.base is bool:
        text = "true or false"
    elif kind.base is tuple and meta["choices"]:
        text = f"a {sep}list of {sorted(meta['choices'])}"
    elif kind.base is tuple:
        count = {2: "two", 3: "three"}.get(kind.length, str(kind.length)) if kind.length else "a list of"
        text = f"{count} {sep}{'integers' if kind.item is int else 'numbers'}{_bounds(meta)}"
    elif meta["choices"]:
        text = f"one of {tuple(meta['choices'])}"
    elif kind.base is int:
        text = f"an integer{_bounds(meta)}"
    elif kind.base is float:
        bounds = _bounds(meta)
        text = f"a {'finite ' if ' in ' not in bounds else ''}number{bounds}"
    else:
        text = "a non-empty string"
    return f"None or {text}" if kind.optional else text


def _valid_scalar(value: Any, base: type, meta: Mapping[str, Any]) -> bool:
    if base is bool:
        return isinstance(value, bool)
    if base is str:
        return isinstance(value, str) and bool(value) and (not meta["choices"] or value in meta["choices"])
    if isinstance(value, bool) or not isinstance(value, (int, float) if base is float else int):
        return False
    return math.isfinite(value) and _in_bounds(value, meta)


def is_valid(value: Any, meta: Mapping[str, Any], kind: Kind) -> bool:
    """Whether `value` is one the field accepts (its type, choices and bounds)."""
    if value is None:
        return kind.optional
    if kind.base is not tuple:
        return _valid_scalar(value, kind.base, meta)
    if not isinstance(value, (tuple, list)) or not value or (kind.length and len(value) != kind.length):
        return False
    if meta["choices"]:
        return all(isinstance(v, str) and v in meta["choices"] for v in value)
    return all(_valid_scalar(v, kind.item, meta) for v in value)


def check_values(cls: type, values: Mapping[str, Any], *, none_given: bool = True) -> None:
    """Check some of a config's fields by their metadata; a SettingError names the first bad one.
    none_given=False: the values cannot be None (flags), so the message does not offer it."""
    for f, kind in specs(cls):
        if f.name in values and not is_valid(values[f.name], f.metadata, kind):
            said = kind if none_given else dataclasses.replace(kind, optional=False)
            raise SettingError(cls.__name__, f"{f.name}={values[f.name]!r} is invalid; expected "
                                             f"{expected(f.metadata, said)}", (f.name,))


def validate(obj: Any) -> None:
    """Check every field of a frozen config dataclass (call from __post_init__); tuple fields are
    stored as tuples (of floats, for number pairs), whatever sequence was given."""
    cls = type(obj)
    check_values(cls, {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})
    for f, kind in specs(cls):
        value = getattr(obj, f.name)
        if kind.base is tuple and value is not None:
            object.__setattr__(obj, f.name, tuple(float(v) if kind.item is float else v for v in value))


class Config:
    """What every config dataclass shares (GPTConfig, TrainConfig, FinetuneConfig): fields checked
    on construction (`check` adds the checks that relate fields), JSON-ready dicts in and out, and
    `replace`. Subclasses are frozen dataclasses whose fields are `setting`s."""

    def __post_init__(self) -> None:
        validate(self)
        self.check()

    def check(self) -> None:
        """Checks that relate fields (raise `invalid(...)`); none by default."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Build from a dict of fields (the JSON of `to_dict`); an unknown key is refused."""
        if not isinstance(d, Mapping):
            raise UsageTypeError(f"{cls.__name__}.from_dict: expected a dict, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise UsageError(f"{cls.__name__}: unknown key(s) {unknown}; valid keys are {valid}")
        required = [f.name for f in dataclasses.fields(cls) if f.name not in d
                    and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if required:
            raise UsageError(f"{cls.__name__}: missing key(s) {required}, which have no default")
        return cls(**d)

    def replace(self, **changes: Any):
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)


def invalid(obj: Any, text: str, *fields: str) -> SettingError:
    """A cross-field error of `obj`, naming `fields` (e.g. "lora_rank and lora_alpha go together")."""
    return SettingError(type(obj).__name__, text, fields)


# --- the command line ------------------------------------------------------------------------------
def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def flags(cls: type, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Field name -> its flag, for every field with one (not internal, not skipped)."""
    return {f.name: flag_of(f) for f in dataclasses.fields(cls)
            if not f.metadata.get("internal") and f.name not in skip}


def comma_type(kind: Kind, meta: Mapping[str, Any]) -> Callable[[str], tuple]:
    """An argparse type for a tuple field: comma-separated items (`0.9,0.95`, `attn,ff`)."""
    def comma_list(text: str) -> tuple:
        items = [t.strip() for t in text.split(",")]
        try:
            value = tuple(kind.item(t) for t in items if t)
        except ValueError:
            value = ()
        if not is_valid(value, meta, kind):
            said = dataclasses.replace(kind, optional=False)
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected(meta, said, 'comma-separated ')}")
        return value
    return comma_list


def shown(value: Any, f: dataclasses.Field, kind: Kind) -> str:
    """A default as the command line writes it: 0.001, 0.9,0.99, --no-compile, or what None means."""
    if value is None:
        return f.metadata.get("unset") or "none"
    if kind.base is bool:
        return flag_of(f) if value else "--no-" + flag_of(f)[2:]
    if kind.base is tuple:
        return ",".join(str(v) for v in value)
    return str(value)


def default_help(f: dataclasses.Field, kind: Kind, default: Any, variants: Mapping[str, Any]) -> str:
    """"(default: 0.001)", or with the values of other named configs where they differ:
    "(default: 0.001; ABC: 0.003)"."""
    text = shown(default, f, kind)
    others = [f"{name}: {shown(getattr(cfg, f.name), f, kind)}" for name, cfg in variants.items()
              if getattr(cfg, f.name) != default]
    return f"(default: {'; '.join([text, *others])})"


def add_arguments(parser: argparse.ArgumentParser, cls: type, title: str, *, skip: tuple[str, ...] = (),
                  defaults: Mapping[str, Any] | None = None, variants: Mapping[str, Any] | None = None,
                  default_text: str | None = None) -> dict[str, Any]:
    """Add a flag for each field of `cls` with one, in argument groups: `title` and each field's own
    `group`. Flags default to None (not given), unless `defaults` names a value. The help ends with
    the dataclass's default (or `default_text`, e.g. "the preset's"), and `variants`' values where
    they differ. Returns the groups by title (to add hand-written flags beside them)."""
    defaults, variants = defaults or {}, variants or {}
    groups: dict[str, Any] = {}
    for f, kind in specs(cls):
        if f.metadata.get("internal") or f.name in skip:
            continue
        name = f.metadata.get("group") or title
        if name not in groups:
            groups[name] = parser.add_argument_group(name)
        said = (f"(default: {default_text})" if default_text
                else default_help(f, kind, defaults.get(f.name, f.default), variants))
        options: dict[str, Any] = dict(dest=f.name, default=defaults.get(f.name), help=f"{f.metadata['help']} {said}")
        if kind.base is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind.base is tuple:
            options["type"], options["metavar"] = comma_type(kind, f.metadata), "LIST"
        else:
            options["type"] = kind.base
            if f.metadata.get("choices"):
                options["choices"] = f.metadata["choices"]
        groups[name].add_argument(flag_of(f), **options)
    return groups


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` whose flags were given (or have a default of the verb's), checked by the
    fields' metadata: a bad value fails here, before any work, naming the field."""
    values = {name: getattr(args, name) for name in flags(cls) if getattr(args, name, None) is not None}
    check_values(cls, values, none_given=False)
    return values
