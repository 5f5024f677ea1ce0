"""Command-line flags generated from the config dataclasses: one place per knob.

A knob is a field of a config dataclass in :mod:`minicompress.config`, documented in its
class's ``Attributes:`` section. :func:`add_config_flags` walks a command's config class
and its nested sections and adds one flag per field:

* name: ``--kebab-name`` of the field. Nested sections are flat (``data.seq_len`` is
  ``--seq-len``, ``target.hidden_size`` is ``--hidden-size``, ``loss.ce_weight`` is
  ``--ce-weight``), except a model section other than ``model``, whose flags carry its
  name (``teacher.dtype`` is ``--teacher-dtype``). A section's ``source`` is named after
  the section (``--data``, ``--model``, ``--teacher``).
* help: the field's docstring entry (its first sentences, markup removed) and the
  command's default (``prune`` scores 256 samples, ``score`` 1024).
* choices: the field's ``metadata["choices"]`` (:func:`~minicompress.config.choice`).
* booleans: one switch away from the default: ``--resume`` sets True, ``--no-speed`` False.
* repeats: a section field with ``metadata["repeat"]`` names a list field beside it; its
  ``source`` flag, given again, adds an entry to that list (``recover --teacher A --teacher
  B``: ``teacher.source`` is A, ``teachers`` is ``[B]``).

So a new setting of :class:`~minicompress.config.RecoverConfig` (a field and its
docstring line) is a ``recover`` flag with no edit here or in :mod:`minicompress.cli`.
:data:`FLAG_NAMES` keeps the older names that differ from the generated ones;
:data:`FLAG_ALIASES` adds second flags for a field (``--divergence reverse`` sets
``loss.kind=reverse_kl``, ``--jsd-beta`` sets ``loss.beta``); a command
excludes fields that are not flags (by dotted key, with the reason). Two fields that
would get the same flag stop the parser from being built, naming both.

A flag stores the text as typed under the destination ``cfg:<dotted.key>``;
:func:`build_from_args` hands it to :func:`~minicompress.config.build_config`, which
coerces (``--max-tokens 16k``) and validates it, so the priority (defaults <
``--config FILE.yaml`` < flags < ``key.sub=value``), the refusal of unknown keys and the
one-line errors (``--seq-len (data.seq_len): must be at least 2``) are the library's own.

Why a generator of our own rather than jsonargparse, tyro or simple-parsing: all three
convert and check the values themselves and build the dataclasses, so ``--max-tokens
16k`` and the ``--flag (key): ...`` errors would give way to their own messages
(multi-line panels in tyro); they name nested fields by their path (``--data.seq_len``,
``--data.seq-len``), so each of today's flat names would need a per-field annotation in
config.py (``Annotated[..., tyro.conf.arg(aliases=...)]``, simple-parsing's
``field(alias=...)``); and the YAML and ``key=value`` layering already lives in
:func:`~minicompress.config.build_config`, which the Python API uses too. What the
libraries would add, flags from fields and help from docstrings, is this module, on the
argparse the CLI already had, with no new dependency.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import types
import typing
from typing import Any, Iterator, Mapping

from .config import DataConfig, LossConfig, ModelConfig, ScoreConfig, declared_defaults
from .errors import ConfigError, MinicompressError

CFG_PREFIX = "cfg:"

#: Flag names kept from before the flags were generated, where they differ from the
#: generated one: ``(config class, field) -> option strings`` (class None: any command's
#: top-level field).
FLAG_NAMES: dict[tuple[type | None, str], tuple[str, ...]] = {
    (None, "output"): ("--output", "-o"),
    (DataConfig, "mixture"): ("--data-mix",),
    (LossConfig, "kind"): ("--loss",),
    (ScoreConfig, "autocast"): ("--score-autocast",),
}
#: Second flags of a field, each with its own names for the values: ``(config class, field) ->
#: ((option, {typed value: config value} or None), ...)``. The mapped names are the flag's
#: choices; the config keeps one key per knob (``--divergence reverse`` is ``loss.kind=reverse_kl``).
FLAG_ALIASES: dict[tuple[type, str], tuple[tuple[str, dict[str, str] | None], ...]] = {
    (LossConfig, "kind"): (("--divergence", {"forward": "forward_kl", "reverse": "reverse_kl", "jsd": "jsd"}),),
    (LossConfig, "beta"): (("--jsd-beta", None),),
}
#: Sections whose flags carry the section's name (``--teacher-dtype``), unless it is ``model``.
PREFIXED_SECTIONS = (ModelConfig,)
#: A help text keeps whole sentences up to this many characters (at least the first).
HELP_CHARS = 220


@dataclasses.dataclass(frozen=True)
class Flag:
    """One generated flag.

    Attributes:
        key: the dotted config key it sets, e.g. ``data.seq_len``.
        names: its option strings, e.g. ``("--seq-len",)``.
        kwargs: the rest of ``add_argument``'s arguments (help, choices, action, const, metavar).
        section: the dotted section it belongs to ("" for a top-level field).
    """

    key: str
    names: tuple[str, ...]
    kwargs: dict
    section: str = ""


# ----------------------------------------------------------------------------------------
# Docstrings


def _attributes(doc: str | None) -> dict[str, str]:
    """``{name: text}`` of a Google-style ``Attributes:`` section, continuation lines joined."""
    lines = inspect.cleandoc(doc or "").splitlines()
    if "Attributes:" not in lines:
        return {}
    out: dict[str, str] = {}
    name, indent = None, None
    for line in lines[lines.index("Attributes:") + 1:]:
        if line.strip() and not line[0].isspace():
            break  # the next section
        match = re.match(r"(\s+)(\w+):(?:\s+(.*))?$", line)
        if match and indent in (None, len(match.group(1))):
            indent, name = len(match.group(1)), match.group(2)
            out[name] = (match.group(3) or "").strip()
        elif name is not None and line.strip():
            out[name] = f"{out[name]} {line.strip()}".strip()
    return out


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` entries of ``cls`` and its base classes, ``{field: text}``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_attributes(klass.__dict__.get("__doc__")))
    return docs


def plain(text: str) -> str:
    """Docstring markup as plain text: double backquotes dropped, ``:class:`~a.B``` as ``B``."""
    text = re.sub(r":\w+:`(~?)([^`]+)`", lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return text.replace("``", "")


def summary(text: str, limit: int = HELP_CHARS) -> str:
    """The first sentences of ``text`` that fit in ``limit`` characters (at least one)."""
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z(])", plain(" ".join(text.split())))
    out = sentences[0]
    for sentence in sentences[1:]:
        if len(out) + 1 + len(sentence) > limit:
            break
        out += " " + sentence
    return out


# ----------------------------------------------------------------------------------------
# Generation


class AliasAction(argparse.Action):
    """Store a :data:`FLAG_ALIASES` flag: its value mapped to the config's (``forward`` ->
    ``forward_kl``), and the option typed, which :func:`flag_names` then names in errors."""

    def __init__(self, option_strings, dest, values_map: dict[str, str] | None = None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.values_map = dict(values_map or {})

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.values_map.get(values, values))
        typed = dict(getattr(namespace, "_typed_flags", None) or {})
        typed[self.dest[len(CFG_PREFIX):]] = option_string
        namespace._typed_flags = typed


def _aliases(cls: type, name: str, dotted: str, section: str, flag: str) -> Iterator[Flag]:
    """The :data:`FLAG_ALIASES` flags of field ``name`` of ``cls`` (whose own flag is ``flag``)."""
    for option, values in FLAG_ALIASES.get((cls, name), ()):
        kwargs: dict[str, Any] = {"action": AliasAction}
        if values:
            names = ", ".join(f"{typed} ({value})" for typed, value in values.items())
            kwargs.update(choices=tuple(values), values_map=values, help=f"{flag} by another name: {names}")
        else:
            kwargs.update(metavar=name.upper(), help=f"{flag} by another name")
        yield Flag(dotted, (option,), kwargs, section)


def _optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _defaults(obj: Any) -> dict[str, Any]:
    """Field values of a config instance, or the declared defaults of a config class."""
    if not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return declared_defaults(obj)


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


class RepeatedFlag(argparse.Action):
    """A flag whose first use sets its own key and each further use appends to the key
    ``more`` (``--teacher A --teacher B``: ``teacher.source`` is A, ``teachers`` is ``[B]``)."""

    def __init__(self, option_strings, dest, more: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.more = more

    def __call__(self, parser, namespace, values, option_string=None):
        if self.dest not in vars(namespace):  # the default is SUPPRESS: absent until given
            setattr(namespace, self.dest, values)
        else:
            more = CFG_PREFIX + self.more
            setattr(namespace, more, [*getattr(namespace, more, []), values])


def _walk(cls: type, defaults: dict, key: str, prefix: str, skip: set[str], repeat: str | None = None
          ) -> Iterator[Flag]:
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    section = key[:-1]
    for f in dataclasses.fields(cls):
        dotted = key + f.name
        if dotted in skip:
            skip.discard(dotted)
            continue
        tp, default = _optional(hints[f.name]), defaults.get(f.name)
        if _is_section(tp):
            inner = f.name != "model" and issubclass(tp, PREFIXED_SECTIONS)
            sub = _defaults(tp if default is None else default)
            if default is None:  # an optional section (no teacher by default): its source has no default
                sub.pop("source", None)
            more = key + f.metadata["repeat"] if "repeat" in f.metadata else None
            yield from _walk(tp, sub, dotted + ".", f"{prefix}{f.name.replace('_', '-')}-" if inner else prefix, skip,
                             more)
            continue
        if f.name not in docs:
            raise TypeError(f"{cls.__name__}.{f.name}: no entry in the class's Attributes: docstring (it is the "
                            "flag's help); document it or exclude the key from the command's flags")
        scalar = tp in (str, int, float, bool) or set(typing.get_args(tp)) == {bool, str}
        if not (scalar or typing.get_origin(tp) is tuple):
            raise TypeError(f"{dotted}: a {tp} field has no flag form; exclude it from the command's flags "
                            f"(it is set with {dotted}.<key>=value or in YAML)")
        kebab = f.name.replace("_", "-")
        help_text = summary(docs[f.name])
        kwargs: dict[str, Any] = {}
        if tp is bool:
            names = (f"--no-{prefix}{kebab}",) if default else (f"--{prefix}{kebab}",)
            kwargs.update(action="store_const", const=not default)
            if default:
                help_text = f"off (on by default): {help_text}"
        else:
            names = (f"--{section.rsplit('.', 1)[-1].replace('_', '-')}",) if f.name == "source" and section \
                else (f"--{prefix}{kebab}",)
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            else:
                metavar = {"source": "SOURCE", "output": "PATH"}.get(f.name, f.name.upper())
                kwargs["metavar"] = metavar + (",..." if typing.get_origin(tp) is tuple else "")
            if default not in (None, (), "") and "default" not in help_text.lower():
                help_text = f"{help_text.removesuffix('.')} (default: {_shown(default)})"
            if repeat is not None and f.name == "source":
                kwargs.update(action=RepeatedFlag, more=repeat)
                help_text = f"{help_text.removesuffix('.')}; give it again for each further {section} ({repeat})"
        names = FLAG_NAMES.get((cls, f.name)) or (FLAG_NAMES.get((None, f.name)) if not key else None) or names
        kwargs["help"] = help_text.replace("%", "%%")
        yield Flag(dotted, names, kwargs, section)
        yield from _aliases(cls, f.name, dotted, section, names[0])


def config_flags(cls: type, *, exclude: Mapping[str, str] | tuple = (), only: tuple[str, ...] | None = None
                 ) -> list[Flag]:
    """The flags of config class ``cls`` (a command's config), in field order.

    Args:
        cls: the config dataclass, e.g. :class:`~minicompress.config.RecoverConfig`.
        exclude: dotted keys without a flag (a section's key excludes the whole section),
            e.g. ``{"seed": "--seed is data.seed"}``; they stay settable as ``key=value``.
        only: top-level fields to give flags to; the rest are YAML / ``key=value`` only.

    Raises:
        TypeError: an undocumented field, a field of a type with no flag form (a dict),
            two fields with the same flag, or an excluded key that is no field.
    """
    skip = set(exclude)
    if only is not None:
        skip |= {f.name for f in dataclasses.fields(cls) if f.name not in only}
    flags = list(_walk(cls, _defaults(cls), "", "", skip))
    if skip & set(exclude):
        raise TypeError(f"{cls.__name__}: excluded keys that are no fields: {', '.join(sorted(skip & set(exclude)))}")
    seen: dict[str, str] = {}
    for flag in flags:
        for name in flag.names:
            if name in seen:
                raise TypeError(f"{name}: the flag of both {seen[name]} and {flag.key} ({cls.__name__}); exclude one "
                                "from the command's flags or name it in FLAG_NAMES")
            seen[name] = flag.key
    return flags


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, exclude: Mapping[str, str] | tuple = (),
                     only: tuple[str, ...] | None = None) -> list[Flag]:
    """Add the flags of :func:`config_flags` to ``parser``, a group of flags per section.

    Top-level fields go with the other options; a section's flags form a group named by
    its key and described by its docstring entry (``teacher: the frozen teacher ...``).
    """
    flags = config_flags(cls, exclude=exclude, only=only)
    groups: dict[str, Any] = {"": parser}
    for flag in flags:
        if flag.section not in groups:
            parent, _, name = flag.section.rpartition(".")
            owner = cls
            for part in parent.split(".") if parent else ():
                owner = _optional(typing.get_type_hints(owner)[part])
            doc = field_docs(owner).get(name)
            groups[flag.section] = parser.add_argument_group(flag.section, summary(doc).replace("%", "%%")
                                                             if doc else None)
        groups[flag.section].add_argument(*flag.names, dest=CFG_PREFIX + flag.key, default=argparse.SUPPRESS,
                                          **flag.kwargs)
    return flags


# ----------------------------------------------------------------------------------------
# Hand-written flags shared by the commands


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` (debug logs) and ``-q/--quiet`` (warnings only, no progress bars)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true",
                       help="show debug log messages, and transformers' own progress bars and warnings")
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars")


def add_set_flag(parser: argparse.ArgumentParser, example: str = "data.seq_len=512") -> None:
    """``--set KEY=VALUE ...`` (trailing ``KEY=VALUE`` words are overrides too)."""
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {example} (also accepted as trailing KEY=VALUE)")


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads."""
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: torch's choice; 1 helps when other jobs share the cores)")


def add_common(parser: argparse.ArgumentParser) -> None:
    """``--config FILE.yaml``, ``--set KEY=VALUE``, ``--threads`` and the logging flags."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys (flags win over it)")
    add_set_flag(parser)
    add_threads_flag(parser)
    add_logging_flags(parser)


# ----------------------------------------------------------------------------------------
# From the parsed flags to a config


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flags_to_overrides(args: argparse.Namespace) -> dict:
    """The nested override dict of the given flags, with ``key=value`` overrides on top.

    Only flags the user actually typed appear (their default is ``SUPPRESS``).

    Raises:
        ConfigError: a malformed ``key=value`` override.
    """
    from .config import parse_overrides

    tree: dict = {}
    for dest, value in sorted(vars(args).items()):
        if dest.startswith(CFG_PREFIX):
            _set_dotted(tree, dest[len(CFG_PREFIX):], value)
    return _deep_merge(tree, parse_overrides(getattr(args, "overrides", None) or []))


def flag_names(args: argparse.Namespace) -> dict[str, str]:
    """``{dotted key: its flag}`` of the parsed subcommand (set by ``build_parser``), the
    :data:`FLAG_ALIASES` flag instead where the user typed that one."""
    return {**getattr(args, "_flag_names", {}), **(getattr(args, "_typed_flags", None) or {})}


def build_from_args(cls: type, args: argparse.Namespace, *, output_needed_for: str | None = None):
    """Build config ``cls`` from ``--config``, the given flags and ``key=value`` overrides.

    A :class:`ConfigError` about a key that came from a flag names the flag too
    (``--seq-len (data.seq_len): ...``). With ``output_needed_for`` (e.g. "prune needs a
    folder for the pruned model") a config without ``output`` is refused with that text.
    """
    from .config import build_config

    try:
        cfg = build_config(cls, getattr(args, "config", None), flags_to_overrides(args))
    except ConfigError as err:
        key, sep, rest = str(err).partition(":")
        flag = flag_names(args).get(key)
        typed = CFG_PREFIX + key in vars(args)
        overridden = any(o.startswith(key + "=") for o in getattr(args, "overrides", None) or [])
        if flag and sep and typed and not overridden:
            raise ConfigError(f"{flag} ({key}):{rest}") from None
        raise
    if output_needed_for is not None and cfg.output is None:
        raise ConfigError(f"--output: {output_needed_for}")
    return cfg


def name_flag(err: MinicompressError, args: argparse.Namespace) -> MinicompressError:
    """``key: message`` from the library as ``--flag (key): message`` when the user typed that flag.

    Commands check values against the model (``target.intermediate_size`` larger than
    the model's FFN) after the config is built; this names the flag in those errors too.
    """
    key, sep, rest = str(err).partition(":")
    flag = flag_names(args).get(key)
    if flag and sep and CFG_PREFIX + key in vars(args):
        return type(err)(f"{flag} ({key}):{rest}")
    return err
