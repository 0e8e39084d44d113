"""Write the configuration reference, docs/reference/config.md, from the YAML files under conf/.

Every config group (a directory of conf/) and every option (a file of it) gets a section: the
file's leading comment, its defaults list, and one table row per key with its value and the comments
written above it or beside it. The page is generated, never edited by hand: change a comment in
conf/ and run this again; ``make docs`` and ``tests/test_docs.py`` fail while the committed page
differs from what this writes.

Usage::

    python tools/config_reference.py          # rewrite docs/reference/config.md
    python tools/config_reference.py --check  # exit 1 if the committed page is not current
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PAGE = ROOT / "docs" / "reference" / "config.md"

# Directories of conf/ that a command reads by name instead of composing them into train/eval.
READ_BY_COMMAND = {
    "ablate": "`convcg ablate NAME` (a grid of variants, not a training option)",
    "hparams_search": "`convcg tune NAME` (an Optuna search, not a training option)",
    "importer": "`convcg data import --source NAME` (a mapping of a log set onto `data_schemas/`)",
}
# How an option of a composed group is chosen on the command line, where it is not `group=option`.
SELECTED_WITH = {"experiment": "+experiment={option}"}
PRIMARY_COMMAND = {
    "train.yaml": "`convcg train`",
    "eval.yaml": "`convcg eval`",
    "bench.yaml": "`make bench` (`python -m convcg_cli.bench run`)",
    "ablate_cell.yaml": "`convcg ablate` on a Hydra launcher (one job per grid cell)",
}

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.\-/]*)\s*:(?P<rest>.*)$")


@dataclass
class Row:
    """One key of a config file: its dotted path, its value as written and what the comments say."""

    path: str
    value: str
    comment: str


@dataclass
class ConfigFile:
    """One YAML file of conf/, read for the reference."""

    path: Path
    header: list[str] = field(default_factory=list)
    package_global: bool = False
    defaults: list[tuple[str, str]] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)


def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment); a ``#`` in quotes or with no space before it stays."""
    quote = ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip(), text[i + 1 :].strip()
    return text.rstrip(), ""


def _comment_text(line: str) -> str:
    return line.strip()[1:].strip()


def _lookup(data: object, path: list[str]) -> object:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _render_value(value: object) -> str:
    if isinstance(value, dict):
        return ""
    if isinstance(value, str) and "\n" in value:
        n = len(value.rstrip().splitlines())
        return f"(text, {n} line{'s' if n > 1 else ''})"
    if value is None:
        return "`null`"
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True).strip()
    text = text.removesuffix("...").strip()
    return f"`{text}`"


def read_config(path: Path) -> ConfigFile:
    """Parse one file: the values through PyYAML, the comments by reading its lines in order."""
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    config = ConfigFile(path)
    lines = text.splitlines()
    i = 0
    while i < len(lines) and lines[i].lstrip().startswith("#"):
        comment = _comment_text(lines[i])
        if comment == "@package _global_":
            config.package_global = True
        else:
            config.header.append(comment)
        i += 1
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    skip_deeper_than: int | None = None  # inside a block scalar or a list: its lines are the value
    in_defaults = False
    for line in lines[i:]:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if not stripped:
            pending = []
            continue
        if in_defaults and stripped.startswith("- "):
            entry, comment = _split_comment(stripped[2:])
            config.defaults.append((entry.strip(), comment))
            continue
        if in_defaults and stripped.startswith("#"):
            continue
        in_defaults = False
        if skip_deeper_than is not None:
            if indent > skip_deeper_than or (indent == skip_deeper_than and stripped.startswith("- ")):
                continue
            skip_deeper_than = None
        if stripped.startswith("#"):
            pending.append(_comment_text(line))
            continue
        if stripped.startswith("- "):  # a list value continues its key's row
            skip_deeper_than = stack[-1][0] if stack else 0
            continue
        match = KEY_LINE.match(line)
        if not match:
            pending = []
            continue
        key = match["key"]
        rest, inline = _split_comment(match["rest"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        keys = [k for _, k in stack] + [key]
        stack.append((indent, key))
        if indent == 0 and key == "defaults":
            in_defaults = True
            pending = []
            continue
        value = _lookup(data, keys)
        if rest.strip() in ("|", ">", "|-", ">-", "|+", ">+"):
            skip_deeper_than = indent
        comment = " ".join([*pending, inline]).strip()
        config.rows.append(Row(".".join(keys), _render_value(value), comment))
        pending = []
    return config


def _escape(text: str) -> str:
    """Markdown-safe prose for a table cell: code spans kept, other markup characters escaped."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(part.replace("|", "\\|"))
            continue
        part = part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        for ch in "\\*_[]|":
            part = part.replace(ch, "\\" + ch)
        out.append(part)
    return "".join(out)


def _package(group: str, config: ConfigFile) -> str:
    if config.package_global or group in READ_BY_COMMAND or not group:
        return ""
    return group.replace("/", ".") + "."


def _anchor(group: str, option: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{group}-{option}".lower()).strip("-")


def _defaults_of(files: dict[str, dict[str, ConfigFile]]) -> dict[str, set[str]]:
    """Group -> the options some defaults list picks (relative entries resolved from their group)."""
    chosen: dict[str, set[str]] = {}
    for group, options in files.items():
        for config in options.values():
            for entry, _ in config.defaults:
                if entry == "_self_" or entry.startswith("override ") or ":" not in entry:
                    continue
                name, option = (part.strip() for part in entry.split(":", 1))
                name = name.lstrip("/") if name.startswith("/") else "/".join(p for p in (group, name) if p)
                chosen.setdefault(name, set()).add(option)
    return chosen


def _section(group: str, option: str, config: ConfigFile, default: bool) -> list[str]:
    rel = config.path.relative_to(ROOT).as_posix()
    if not group:
        title, how = f"`{option}`", PRIMARY_COMMAND.get(config.path.name, "")
    elif group in READ_BY_COMMAND:
        title = f"`{group}/{option}`"
        how = READ_BY_COMMAND[group].split("` ", 1)[0].replace("NAME", option) + "`"
    else:
        pattern = SELECTED_WITH.get(group, "{group}={option}")
        title = f"`{pattern.format(group=group, option=option)}`"
        how = "the default" if default else ""
    lines = [f"### {title} {{#{_anchor(group or 'primary', option)}}}", ""]
    meta = f"File `{rel}`" + (f"; {how}" if how else "") + "."
    if config.package_global:
        meta += " Keys are global (`# @package _global_`)."
    lines += [meta, ""]
    header = list(config.header)
    if header and header[0].startswith(("convcg ", "make ")):  # an experiment's or grid's command
        lines += [f"Run: `{header.pop(0)}`", ""]
    if header:
        lines += [_escape(" ".join(header)), ""]
    if config.defaults:
        entries = [f"`{e}`" + (f" ({_escape(c)})" if c else "") for e, c in config.defaults]
        lines += ["Defaults list: " + ", ".join(entries) + ".", ""]
    if config.rows:
        prefix = _package(group, config)
        lines += ["| key | value | what it is |", "|---|---|---|"]
        for row in config.rows:
            value = row.value.replace("|", "\\|")
            lines.append(f"| `{prefix}{row.path}` | {value} | {_escape(row.comment)} |")
        lines.append("")
    return lines


def render() -> str:
    """The whole reference page, as markdown."""
    files: dict[str, dict[str, ConfigFile]] = {}
    for path in sorted(CONF.rglob("*.yaml")):
        rel = path.relative_to(CONF)
        group = rel.parent.as_posix() if rel.parent != Path(".") else ""
        option = rel.with_suffix("").name
        if group.split("/", 1)[0] in ("experiment", "ablate", "hparams_search", "importer"):
            top, _, sub = group.partition("/")
            group, option = top, f"{sub}/{option}" if sub else option
        files.setdefault(group, {})[option] = read_config(path)
    chosen = _defaults_of(files)
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by tools/config_reference.py from conf/: do not edit; run `make docs`. -->",
        "",
        "Every config group of `conf/` and every option in it, with each key's value and the comments",
        "written beside it in the YAML. A group's option is chosen with `group=option` on the command",
        "line (`model/head=multi_head`), an experiment with `+experiment=NAME`, any key with",
        "`key=value` (see [the CLI](cli.md) and [config groups](config-groups.md)). Keys are shown with",
        "the package they land in (`data.batch_size`).",
        "",
        "| group | options (the default in bold) | chosen with |",
        "|---|---|---|",
    ]
    for group in sorted(files, key=lambda g: (g != "", g)):
        names = []
        for option in files[group]:
            label = f"[{option}](#{_anchor(group or 'primary', option)})"
            names.append(f"**{label}**" if option in chosen.get(group, ()) else label)
        if not group:
            how = "the command"
        elif group in READ_BY_COMMAND:
            how = READ_BY_COMMAND[group]
        else:
            pattern = SELECTED_WITH.get(group, "{group}={option}")
            how = "`" + pattern.format(group=group, option="OPTION") + "`"
        out.append(f"| {f'`{group}/`' if group else 'primary configs'} | {', '.join(names)} | {how} |")
    out.append("")
    for group in sorted(files, key=lambda g: (g != "", g)):
        out += [f"## {f'`{group}/`' if group else 'Primary configs'}", ""]
        for option, config in files[group].items():
            out += _section(group, option, config, option in chosen.get(group, ()))
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is not current")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is not current: run python tools/config_reference.py")
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
