"""Write conf/README.md, the reference of every config group, option and key.

Everything in it is read from two sources, so that it cannot drift from them:

- the typed schema, ``xbarflow/config.py``: every dataclass field's name, type and default, the
  range of its ``rf(...)`` metadata (ge / gt / le / lt / choices) and its comments (the one at the
  end of the field's line and the comment lines right above it); read with ``ast`` and
  ``tokenize``, without importing xbarflow (so this runs without torch, Hydra or the venv);
- the option files ``conf/<group>/*.yaml``: their header comment, every key they set and its
  comments; ``conf/config.yaml`` says which option of each group is the default.

A unit is taken from a comment that starts with one (``# ohm, ...``, ``# seconds; ...``) or names
one after a comma (``..., GB; null: ...``).

    python scripts/gen_conf_readme.py            # (re)write conf/README.md
    python scripts/gen_conf_readme.py --check    # exit 1, with one line, when conf/README.md is stale

``tests/test_docs.py`` runs the check: a key added to the schema or to a YAML file without
regenerating fails the suite.
"""
from __future__ import annotations

import argparse
import ast
import io
import re
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = Path("xbarflow/config.py")
CONF = Path("conf")
OUT = CONF / "README.md"

# unit words recognised at the start of a comment ("ohm, row driver ...") or after a comma
# ("..., GB; null: ..."); single letters only in those two positions
_LONG_UNITS = ("ohm", "ohms", "volt", "volts", "ampere", "amperes", "siemens", "second", "seconds",
               "minute", "minutes", "hour", "hours", "joule", "joules", "watt", "watts", "bytes")
_SHORT_UNITS = ("V", "A", "S", "s", "ms", "us", "ns", "ps", "J", "mJ", "uJ", "nJ", "pJ", "fJ", "aJ",
                "W", "mW", "uW", "nW", "Hz", "kHz", "MHz", "GHz", "GB", "GiB", "MB", "MiB", "kOhm")
_UNIT = "|".join(sorted((re.escape(u) for u in _LONG_UNITS + _SHORT_UNITS), key=len, reverse=True))
_UNIT_AT_START = re.compile(rf"^({_UNIT})(?:[,;:)]|$)")
_LONG_UNIT_AT_START = re.compile(rf"^({'|'.join(_LONG_UNITS)})\s")
_UNIT_AFTER_COMMA = re.compile(rf",\s+({_UNIT})(?:[,;)]|$)")


def unit_of(comment: str) -> str:
    """The unit a field's comment states, or ''."""
    text = comment.strip()
    for pattern in (_UNIT_AT_START, _LONG_UNIT_AT_START, _UNIT_AFTER_COMMA):
        m = pattern.search(text)
        if m:
            return m.group(1)
    return ""


def _without_unit(comment: str) -> str:
    """A comment without the unit it starts with ("ohm, lowest ..." -> "lowest ...")."""
    m = _UNIT_AT_START.search(comment.strip())
    return comment.strip()[m.end():].strip() if m else comment.strip()


# ---------------------------------------------------------------------------------------------
# the schema


@dataclass
class Key:
    name: str                 # dotted, relative to its group
    type: str
    default: str              # as written in YAML; "required" when the schema has none
    allowed: str
    unit: str
    meaning: str


@dataclass
class Schema:
    name: str                 # the dataclass
    doc: str
    keys: List[Key] = field(default_factory=list)
    free_form: bool = False   # a Dict field (the model group): its keys are the target's arguments


def _comments(source: str) -> Dict[int, str]:
    """Line number -> the comment on that line (without '#')."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string[1:].strip()
    return out


def _leading_comment(lines: List[str], lineno: int, comments: Dict[int, str]) -> str:
    """The comment-only lines right above line ``lineno`` (1-based), joined."""
    above = []
    i = lineno - 1
    while i >= 1 and lines[i - 1].strip().startswith("#"):
        above.append(comments.get(i, ""))
        i -= 1
    return " ".join(reversed(above)).strip()


_SAFE = {"__builtins__": {}, "tuple": tuple, "list": list, "range": range}


def _literal(node: ast.AST, constants: Dict[str, object]):
    """The value of a default or bound: a literal, a module constant or arithmetic on them."""
    if isinstance(node, ast.Name) and node.id == "MISSING":
        return _REQUIRED
    try:
        return ast.literal_eval(node)
    except ValueError:   # e.g. MAX_OHM, 2**32 - 1: the repository's own schema, evaluated without builtins
        return eval(compile(ast.Expression(node), "<schema>", "eval"), {**_SAFE, **constants})  # noqa: S307


class _Required:
    def __repr__(self):
        return "required"


_REQUIRED = _Required()


def _yaml_value(value) -> str:
    if value is _REQUIRED:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f'"{v}"' if isinstance(v, str) else _yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and value != 0 and not 1e-4 <= abs(value) < 1e6:
        return f"{value:g}"          # 1e+12, 1e-07
    return str(value)


def _number(x) -> str:
    return _yaml_value(x)


def _allowed(check: Dict[str, object]) -> str:
    if check.get("choices") is not None:
        return ", ".join(f"`{c}`" for c in check["choices"])
    lo = ("ge", check["ge"]) if check.get("ge") is not None else ("gt", check.get("gt"))
    hi = ("le", check["le"]) if check.get("le") is not None else ("lt", check.get("lt"))
    if lo[1] is not None and hi[1] is not None:
        return (("[" if lo[0] == "ge" else "(") + f"{_number(lo[1])}, {_number(hi[1])}"
                + ("]" if hi[0] == "le" else ")"))
    if lo[1] is not None:
        return (">= " if lo[0] == "ge" else "> ") + _number(lo[1])
    if hi[1] is not None:
        return ("<= " if hi[0] == "le" else "< ") + _number(hi[1])
    return ""


def _type(node: ast.AST) -> str:
    text = ast.unparse(node)
    m = re.fullmatch(r"Optional\[(.*)\]", text)
    if m:
        return f"{_type(ast.parse(m.group(1), mode='eval').body)} or null"
    m = re.fullmatch(r"List\[(.*)\]", text)
    if m:
        return f"list of {m.group(1)}"
    m = re.fullmatch(r"Dict\[(.*)\]", text)
    if m:
        return "mapping"
    return text


def parse_schema(source: str) -> Tuple[Dict[str, Schema], Dict[str, str], List[Tuple[str, str, str]]]:
    """Read the dataclasses of the schema's source.

    Returns:
        the schemas by class name; the nested dataclass fields (class.field -> class); and the
        fields of the top-level ``Config`` as (name, class or '', leading comment) in order.
    """
    tree = ast.parse(source)
    lines = source.splitlines()
    comments = _comments(source)
    constants: Dict[str, object] = {}
    for node in tree.body:   # module-level constants a range may name (e.g. OBJECTIVES)
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = _literal(node.value, constants)
            except Exception:
                pass
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)
               and any(ast.unparse(d) in ("dataclass", "dataclasses.dataclass") for d in n.decorator_list)]
    names = {c.name for c in classes}
    schemas: Dict[str, Schema] = {}
    nested: Dict[str, str] = {}
    top: List[Tuple[str, str, str]] = []
    for cls in classes:
        schema = Schema(cls.name, " ".join((ast.get_docstring(cls) or "").split()))
        schemas[cls.name] = schema
        for stmt in cls.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            name = stmt.target.id
            trailing = comments.get(stmt.end_lineno, "") if stmt.end_lineno else ""
            leading = _leading_comment(lines, stmt.lineno, comments)
            unit = unit_of(trailing or leading)
            if trailing and leading:   # a note on the fields that follow, then this field's own
                meaning = f"{leading} — {_without_unit(trailing)}"
            else:
                meaning = _without_unit(trailing or leading)
            value, check, child = _REQUIRED, {}, ""
            v = stmt.value
            if v is None:
                value = _REQUIRED
            elif isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "rf":
                value = _literal(v.args[0], constants) if v.args else _REQUIRED
                check = {k.arg: _literal(k.value, constants) for k in v.keywords}
            elif isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "field":
                kw = {k.arg: k.value for k in v.keywords}
                factory = kw.get("default_factory")
                if isinstance(factory, ast.Name) and factory.id in names:
                    child = factory.id
                elif isinstance(factory, ast.Name):
                    value = {"list": [], "dict": {}}.get(factory.id, factory.id)
                elif isinstance(factory, ast.Lambda):
                    value = _literal(factory.body, constants)
                elif "default" in kw:
                    value = _literal(kw["default"], constants)
            else:
                try:
                    value = _literal(v, constants)
                except ValueError:
                    value = ast.unparse(v)
            if cls.name == "Config":
                top.append((name, child, meaning))
            if child:
                nested[f"{cls.name}.{name}"] = child
                continue
            type_ = _type(stmt.annotation)
            if type_ == "mapping" and cls.name == "Config":
                continue
            schema.keys.append(Key(name, type_, _yaml_value(value), _allowed(check), unit, meaning))
    # flatten nested dataclasses (xbar.layers.*, training.noise.*) into their parent's keys
    for cls_name, schema in schemas.items():
        for path, child in nested.items():
            owner, fname = path.split(".")
            if owner == cls_name and cls_name != "Config":
                for k in schemas[child].keys:
                    schema.keys.append(Key(f"{fname}.{k.name}", k.type, k.default, k.allowed, k.unit,
                                           k.meaning))
    return schemas, nested, top


# ---------------------------------------------------------------------------------------------
# the option files


@dataclass
class OptionKey:
    name: str
    value: str
    comment: str


@dataclass
class Option:
    group: str
    name: str
    header: List[str]          # comment lines above the first key, '#' removed, indentation kept
    defaults: List[str]
    keys: List[OptionKey]


_KEY = re.compile(r"^(\s*)([A-Za-z_][\w./-]*|'[^']*'|\"[^\"]*\"):(?:\s+(.*))?$")


def _split_comment(text: str) -> Tuple[str, str]:
    """``value  # comment`` -> (value, comment), a '#' inside quotes or ${...} kept."""
    quote = None
    depth = 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "#" and depth == 0 and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip(), text[i + 1:].strip()
    return text.rstrip(), ""


def parse_option(group: str, path: Path) -> Option:
    lines = path.read_text().splitlines()
    header: List[str] = []
    i = 0
    while i < len(lines) and (lines[i].startswith("#") or not lines[i].strip()):
        text = lines[i][1:] if lines[i].startswith("#") else ""
        if text.strip() != "@package _global_":
            header.append(text[1:] if text.startswith(" ") else text)
        i += 1
    while header and not header[-1].strip():
        header.pop()
    option = Option(group, path.stem, header, [], [])
    stack: List[Tuple[int, str]] = []   # (indent, key) of the open mappings
    pending: List[str] = []             # comment lines above the next key
    list_owner: Optional[OptionKey] = None
    for line in lines[i:]:
        stripped = line.strip()
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            pending.append(stripped[1:].strip())
            continue
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("- "):
            item, comment = _split_comment(stripped[2:])
            if stack and stack[-1][1] == "defaults" and len(stack) == 1:
                option.defaults.append(item.replace("override /", ""))
            elif list_owner is not None:
                list_owner.value = (list_owner.value[:-1] + ", " if list_owner.value != "[]" else "[") \
                    + item + "]"
            pending = []
            continue
        m = _KEY.match(line)
        if not m:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = m.group(2).strip("'\"")
        value, comment = _split_comment(m.group(3) or "")
        dotted = ".".join([k for _, k in stack] + [key])
        meaning = " ".join(pending + ([comment] if comment else []))
        pending = []
        list_owner = None
        if value == "":
            stack.append((indent, key))
            if key != "defaults" and dotted != "hydra":
                # an open mapping; its keys follow (or it is a list: then it gets the items)
                list_owner = OptionKey(dotted, "[]", meaning)
                option.keys.append(list_owner)
            continue
        option.keys.append(OptionKey(dotted, value, meaning))
    # a mapping key whose children followed is not a key of its own, unless it holds a comment
    children = {k.name.rsplit(".", 1)[0] for k in option.keys if "." in k.name}
    kept = []
    carried = ""                        # a mapping's comment goes to its first key
    for k in option.keys:
        if k.value == "[]" and k.name in children:
            carried = k.comment
            continue
        if carried:
            k.comment = " ".join((carried, k.comment)).strip()
            carried = ""
        kept.append(k)
    option.keys = kept
    return option


def _defaults_of(config_yaml: Path) -> Dict[str, str]:
    out = {}
    for item in parse_option("", config_yaml).defaults:
        if ":" in item:
            g, o = (s.strip() for s in item.split(":", 1))
            out[g] = o
    return out


# ---------------------------------------------------------------------------------------------
# the page


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _header_markdown(header: List[str]) -> List[str]:
    """Comment lines -> paragraphs; indented lines (commands, lists) -> a code block."""
    out: List[str] = []
    prose: List[str] = []
    code: List[str] = []

    def flush():
        if prose:
            out.extend([" ".join(prose), ""])
            prose.clear()
        if code:
            indent = min(len(c) - len(c.lstrip()) for c in code)
            out.extend(["```", *(c[indent:] for c in code), "```", ""])
            code.clear()

    for line in header:
        if not line.strip():
            flush()
        elif line.startswith(" "):
            if prose:
                flush()
            code.append(line.rstrip())
        else:
            if code:
                flush()
            prose.append(line.strip())
    flush()
    return out


def _option_section(option: Option, title: str, is_default: bool, units: Dict[str, str]) -> List[str]:
    out = [title + (" (default)" if is_default else ""), ""]
    out += _header_markdown(option.header)
    if option.defaults:
        out += ["Composes: " + ", ".join(f"`{d}`" for d in option.defaults) + ".", ""]
    if option.keys:
        out += ["| key | value | unit | note |", "|---|---|---|---|"]
        for k in option.keys:
            value = f"`{_cell(k.value)}`" if k.value else ""
            prefix = f"{option.group}." if option.group != "experiment" else ""
            unit = unit_of(k.comment) or units.get(prefix + k.name, "")
            out.append(f"| `{k.name}` | {value} | {unit} | {_cell(k.comment)} |")
        out.append("")
    return out


def _keys_table(prefix: str, keys: List[Key]) -> List[str]:
    out = ["| key | type | default | unit | allowed | meaning |", "|---|---|---|---|---|---|"]
    for k in keys:
        out.append(f"| `{prefix}{k.name}` | {_cell(k.type)} | `{_cell(k.default)}` | {k.unit} | "
                   f"{_cell(k.allowed)} | {_cell(k.meaning)} |")
    out.append("")
    return out


def generate(root: Path = ROOT, schema_source: Optional[str] = None) -> str:
    """The text of conf/README.md for the repository at ``root`` (or for another schema source)."""
    source = schema_source if schema_source is not None else (root / SCHEMA).read_text()
    schemas, nested, top = parse_schema(source)
    conf = root / CONF
    group_dirs = sorted({p.parent.relative_to(conf).as_posix() for p in conf.glob("**/*.yaml")
                         if p.parent != conf})
    defaults = _defaults_of(conf / "config.yaml")
    schema_groups = {name: child for name, child, _ in top if child}
    group_comment = {name: comment for name, _, comment in top}
    order = [g for g in defaults if g in group_dirs or g in schema_groups]
    order += [g for g in list(schema_groups) + group_dirs if g not in order]

    out = [
        "# Configuration reference",
        "",
        "<!-- generated by scripts/gen_conf_readme.py from xbarflow/config.py and conf/**/*.yaml;"
        " do not edit: run `python scripts/gen_conf_readme.py` -->",
        "",
        "Every group, option and key of xbarflow's Hydra configuration. A run composes one option of "
        "each group (`conf/config.yaml` names the defaults); any key can then be set on the command "
        "line (`python run.py hardware=pcm xbar.size=128 eval.n_chips=10`) or swept "
        "(`python run.py -m xbar.size=64,256`). The types, defaults and allowed ranges come from the "
        "schema, `xbarflow/config.py`: unknown keys are refused, and a value outside its range stops "
        "the run before any work with one line that names the key. Units are those the schema's "
        "comments state. How the values are checked, and a device file outside the repository: "
        "[docs/configuration.md](../docs/configuration.md).",
        "",
        "## Groups",
        "",
        "| group | options (default in bold) | schema |",
        "|---|---|---|",
    ]
    options: Dict[str, List[Path]] = {g: sorted((conf / g).glob("*.yaml")) for g in group_dirs}
    units = {f"{g}.{k.name}": k.unit for g, cls in schema_groups.items() for k in schemas[cls].keys}
    units.update({k.name: k.unit for k in schemas["Config"].keys} if "Config" in schemas else {})
    for g in order:
        opts = ", ".join(f"**`{p.stem}`**" if defaults.get(g) == p.stem else f"`{p.stem}`"
                         for p in options.get(g, []))
        schema = schema_groups.get(g, "")
        kind = f"`{schema}`" if schema else ("free-form (`_target_` and its arguments)"
                                            if g in group_comment else "")
        out.append(f"| [`{g}`](#{_anchor(g)}) | {opts} | {kind} |")
    top_keys = schemas.get("Config")
    if top_keys and top_keys.keys:
        out.append(f"| [top-level keys](#{_anchor('top-level keys')}) | | `Config` |")
    out.append("")

    for g in order:
        out += [f"## {g}", ""]
        if group_comment.get(g):
            out += [group_comment[g], ""]
        schema = schemas.get(schema_groups.get(g, ""))
        if schema:
            if schema.doc:
                out += [schema.doc, ""]
            for path, child in nested.items():
                if path.split(".")[0] == schema.name and schemas[child].doc:
                    out += [f"`{g}.{path.split('.')[1]}`: {schemas[child].doc}", ""]
            out += _keys_table(f"{g}.", schema.keys)
        for p in options.get(g, []):
            out += _option_section(parse_option(g, p), f"### `{g}={p.stem}`", defaults.get(g) == p.stem, units)

    if top_keys and top_keys.keys:
        out += ["## top-level keys", "",
                "Keys of the top-level config itself (`seed=1`, `mode=evaluate source=<run id>`).", ""]
        out += _keys_table("", top_keys.keys)
        out += _option_section(parse_option("experiment", conf / "config.yaml"), "### `conf/config.yaml`",
                               False, units)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when conf/README.md differs from what this script writes")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this one)")
    args = parser.parse_args(argv)
    text = generate(args.root)
    out = args.root / OUT
    if args.check:
        if not out.is_file() or out.read_text() != text:
            print(f"{OUT} is stale: run `python scripts/gen_conf_readme.py` and commit it")
            return 1
        return 0
    out.write_text(text)
    print(f"wrote {out} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
