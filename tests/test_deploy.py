"""deploy/ and docs/operations.md against the code they drive.

- every YAML under deploy/ parses (all documents), and the cluster-launcher config passes Ray's
  own schema;
- the KubeRay objects have the kinds, API versions and shape CapFilt needs (a head, a CPU and a
  GPU worker group; a RayJob on that cluster; the REST service reaching the head's Ray Client and
  dashboard ports, its API key from a Secret, every path on the shared volume);
- the images and manifests name the Ray (and torch) CapFilt is developed with;
- every `capfilt ...` command line in deploy/ (YAML command/args and strings, comments,
  Dockerfiles, README) and in docs/operations.md parses with the real CLI parser, and a `clean`
  command also passes `CleanConfig.validate`; flags named in the docs' prose exist.

Nothing here needs a cluster, Docker or the network.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib
import io
import json
import os
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from capfilt.cli import build_parser
from capfilt.errors import CapfiltError

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCS = ROOT / "docs" / "operations.md"
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
DOCKERFILES = sorted(p for p in DEPLOY.rglob("Dockerfile*") if not p.name.endswith(".dockerignore"))
MARKDOWN = sorted([*DEPLOY.rglob("*.md"), DOCS])
RAY_VERSION = ray.__version__
TORCH_VERSION = version("torch").split("+")[0]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ── the CLI parser ──────────────────────────────────────────────────────────────────────────────


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def capfilt_parser() -> argparse.ArgumentParser:
    """`capfilt.cli.build_parser()`, plus `serve` and `bench serve` from their own modules while the
    CLI does not list them yet (their parsers are the ones `capfilt` will use)."""
    parser = build_parser()
    sub = _subparsers(parser)
    assert sub is not None
    if "serve" not in sub.choices:
        from capfilt.services.serve_cli import add_serve_parser

        add_serve_parser(sub)
    if "bench" not in sub.choices:
        from capfilt.services.bench_cli import add_bench_serve_parser

        bench = sub.add_parser("bench", help="benchmarks")
        add_bench_serve_parser(bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True))
    _no_abbreviations(parser)
    return parser


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Files must spell flags out: `--captioner-actor` works today only because it is a unique
    prefix, which a new flag can end."""
    parser.allow_abbrev = False
    sub = _subparsers(parser)
    for child in sub.choices.values() if sub is not None else ():
        _no_abbreviations(child)


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return capfilt_parser()


def _resolve(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """Follow subcommand names from the top; returns the innermost parser and the rest."""
    i = 0
    while i < len(words):
        sub = _subparsers(parser)
        if sub is None or words[i] not in sub.choices:
            break
        parser = sub.choices[words[i]]
        i += 1
    return parser, words[i:]


def _options(parser: argparse.ArgumentParser, recursive: bool = False) -> set[str]:
    found = {s for a in parser._actions for s in a.option_strings}
    sub = _subparsers(parser)
    if recursive and sub is not None:
        for child in sub.choices.values():
            found |= _options(child, recursive=True)
    return found


def check_command(
    parser: argparse.ArgumentParser, argv: Iterable[str], where: str
) -> argparse.Namespace | None:
    """Fail the test unless `capfilt ARGV` parses (and a `clean` command validates).

    A help request is checked as a path of subcommand names (argparse would exit before looking
    at the rest)."""
    argv = list(argv)
    shown = f"capfilt {shlex.join(argv)}"
    if {"-h", "--help"} & set(argv):
        words = [a for a in argv if a not in ("-h", "--help", "-v", "--verbose")]
        _, rest = _resolve(parser, words)
        assert not rest, f"{where}: `{shown}` names no command ({rest} left over)"
        return None
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `{shown}` does not parse:\n{err.getvalue().strip()}")
    if args.command == "clean":
        from capfilt.pipelines.clean_cli import config_from_args

        try:
            config_from_args(args).validate()
        except CapfiltError as error:
            pytest.fail(f"{where}: `{shown}` is refused: {error}")
    return args


# ── finding `capfilt ...` command lines ─────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]  # the arguments after `capfilt`
    where: str


DUMMY = "1"  # stands for every $VAR, ${VAR}, $(...) and <placeholder>: a number, a path and a name at once
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\([^)]*\)|\$[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"<[A-Za-z][\w.-]*>")
_REDIRECT = re.compile(r"(?<!\S)\d*(?:>>?|<)&?\s*\S+")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_WRAPPERS = {"exec", "env", "sudo", "nohup", "time", "nice", "command"}
_SHELLS = {"sh", "bash", "zsh", "dash"}
_COMMAND_LINE = re.compile(r"^(?:[A-Za-z_]\w*=\S*\s+)*(?:capfilt|ray|kubectl|docker|pip|python[\d.]*)\s")


def _invocation(tokens: list[str]) -> list[str] | None:
    """The capfilt arguments when `tokens` start with `capfilt` or `python -m capfilt.cli`."""
    if not tokens:
        return None
    program = os.path.basename(tokens[0])
    if program == "capfilt":
        return tokens[1:]
    if re.fullmatch(r"python[\d.]*", program) and tokens[1:3] == ["-m", "capfilt.cli"]:
        return tokens[3:]
    return None


def _segment_command(tokens: list[str]) -> list[str] | None:
    """A capfilt invocation in one simple command: at its start (after VAR=x and wrappers like
    `exec`), or after a `--` (`ray job submit ... -- capfilt ...`, `kubectl exec ... -- capfilt`)."""
    i = 0
    while i < len(tokens) and (_ASSIGNMENT.match(tokens[i]) or tokens[i] in _WRAPPERS):
        i += 1
    for start in [i] + [j + 1 for j, t in enumerate(tokens) if t == "--"]:
        argv = _invocation(tokens[start:])
        if argv is not None:
            return argv
    return None


def shell_commands(text: str, where: str, nested: bool = False) -> list[Command]:
    """Every capfilt invocation in shell text: line continuations joined, variables and
    placeholders replaced by a dummy value, redirections dropped, split at `;`, `&&`, `|`...
    Quoted arguments holding whitespace are searched too (`bash -c "..."`, `ray exec CFG "..."`)."""
    text = re.sub(r"\\\r?\n", " ", text)
    found: list[Command] = []
    for line in text.splitlines():
        line = re.sub(r"^\s*\$ ", "", line)  # a console prompt
        line = _REDIRECT.sub(" ", _PLACEHOLDER.sub(DUMMY, _VARIABLE.sub(DUMMY, line)))
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as err:  # unbalanced quotes
            if not nested and re.search(r"(^|[\s/])capfilt\s", line):
                pytest.fail(f"{where}: cannot split this capfilt command line ({err}): {line!r}")
            continue
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token and set(token) <= set("();<>|&"):
                argv = _segment_command(segment)
                if argv is not None:
                    found.append(Command(tuple(argv), where))
                segment = []
            else:
                segment.append(token)
        for token in tokens:
            if re.search(r"\s", token) and "capfilt" in token:
                found.extend(shell_commands(token, where, nested=True))
    return found


def list_commands(argv: list[str], where: str) -> list[Command]:
    """A command given as a list (a container's command + args, a Dockerfile's JSON form)."""
    direct = _invocation(argv)
    if direct is not None:
        return [Command(tuple(direct), where)]
    if argv and os.path.basename(argv[0]) in _SHELLS and len(argv) >= 3 and argv[1] in ("-c", "-lc", "-ec"):
        return shell_commands(argv[2], where)
    return [c for item in argv if re.search(r"\s", item) for c in shell_commands(item, where, nested=True)]


def yaml_commands(doc: Any, where: str) -> list[Command]:
    """Commands in a parsed YAML document: containers' command + args, and any string (a RayJob's
    entrypoint, the cluster launcher's setup and start commands)."""
    found: list[Command] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            skip: set[str] = set()
            if isinstance(node.get("command"), list) or isinstance(node.get("args"), list):
                argv = [str(x) for x in (node.get("command") or []) + (node.get("args") or [])]
                found.extend(list_commands(argv, f"{where}{path}"))
                skip = {"command", "args"}
            for key, value in node.items():
                if key not in skip:
                    walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")
        elif isinstance(node, str) and re.search(r"\s", node.strip()):  # a label `capfilt` is no command
            found.extend(shell_commands(node, f"{where}{path}"))

    walk(doc, ":")
    return found


def comment_commands(text: str, where: str) -> list[Command]:
    """Command lines in `#` comments (usage examples), continuations joined."""
    found: list[Command] = []
    lines = [m.group(1) for m in re.finditer(r"^\s*#\s?(.*)$", text, flags=re.M)]
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if _COMMAND_LINE.match(line):
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            found.extend(shell_commands(line, f"{where}:comment"))
        i += 1
    return found


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        op, _, rest = (pending + line).partition(" ")
        out.append((op.upper(), rest.strip()))
        pending = ""
    return out


def dockerfile_commands(text: str, where: str) -> list[Command]:
    found = comment_commands(text, where)
    for op, rest in dockerfile_instructions(text):
        if op in ("RUN", "CMD", "ENTRYPOINT"):
            if rest.startswith("["):
                found.extend(list_commands(json.loads(rest), f"{where}:{op}"))
            else:
                found.extend(shell_commands(rest, f"{where}:{op}"))
    return found


_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", flags=re.M | re.S)


def markdown_blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]


def markdown_commands(text: str, where: str) -> list[Command]:
    found: list[Command] = []
    for lang, body in markdown_blocks(text):
        if lang in ("", "bash", "sh", "shell", "console"):
            found.extend(shell_commands(body, f"{where}:```{lang}"))
        elif lang in ("yaml", "yml"):
            for doc in yaml.safe_load_all(body):
                found.extend(yaml_commands(doc, f"{where}:```yaml"))
    return found


def _yaml_docs(path: Path) -> list[Any]:
    return list(yaml.safe_load_all(path.read_text()))


def deploy_commands() -> list[Command]:
    found: list[Command] = []
    for path in YAML_FILES:
        text = path.read_text()
        found.extend(comment_commands(text, _rel(path)))
        for doc in yaml.safe_load_all(text):
            found.extend(yaml_commands(doc, _rel(path)))
    for path in DOCKERFILES:
        found.extend(dockerfile_commands(path.read_text(), _rel(path)))
    for path in DEPLOY.rglob("*.md"):
        found.extend(markdown_commands(path.read_text(), _rel(path)))
    return found


# ── the extractor itself: it must find what is there and nothing else ───────────────────────────


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("capfilt clean --input a --output b", [["clean", "--input", "a", "--output", "b"]]),
        (
            "ray job submit --no-wait -- capfilt clean --input $IN --output ${OUT}/x \\\n    --resume",
            [["clean", "--input", DUMMY, "--output", f"{DUMMY}/x", "--resume"]],
        ),
        ("RAY_ADDRESS=http://h:8265 capfilt --help > /dev/null 2>&1 && echo ok", [["--help"]]),
        ("pip install capfilt && kubectl get svc capfilt-head-svc", []),
        (
            "bash -c \"capfilt score --model <ckpt> --text 'a dog'\"",
            [["score", "--model", DUMMY, "--text", "a dog"]],
        ),
        ("/home/ray/anaconda3/bin/python -m capfilt.cli demo  # comment", [["demo"]]),
        ("$ capfilt data synth --out world", [["data", "synth", "--out", "world"]]),
    ],
)
def test_shell_commands_are_found(text: str, expected: list[list[str]]) -> None:
    assert [list(c.argv) for c in shell_commands(text, "t")] == expected


def test_container_and_dockerfile_forms_are_found() -> None:
    container = {"command": ["capfilt"], "args": ["serve", "--port", "8000"]}
    assert [c.argv for c in yaml_commands({"spec": [container]}, "t")] == [("serve", "--port", "8000")]
    shell = {"command": ["/bin/sh", "-c", "mkdir -p /x && exec capfilt clean --resume"]}
    assert [c.argv for c in yaml_commands(shell, "t")] == [("clean", "--resume")]
    dockerfile = 'FROM x\nRUN pip install . \\\n    && capfilt --help\nCMD ["capfilt", "serve"]\n'
    assert [c.argv for c in dockerfile_commands(dockerfile, "t")] == [("--help",), ("serve",)]
    comments = "# usage:\n#   capfilt clean --input a \\\n#       --resume\n# the `capfilt clean` job\n"
    assert [c.argv for c in comment_commands(comments, "t")] == [("clean", "--input", "a", "--resume")]


CLEAN = ["clean", "--input", "a", "--output", "b", "--captioner", "c", "--filter", "d"]


@pytest.mark.parametrize(
    "argv",
    [
        [*CLEAN, "--no-such-flag"],
        [*CLEAN, "--threshold", "2"],  # parses, but CleanConfig.validate refuses it
        CLEAN[:-2],  # --filter is required
        [*CLEAN, "--captioner-actor", "2"],  # an abbreviation: spell flags out
        ["serve", "--captioner", "c", "--filter", "f", "--auth", "everyone"],
        ["no-such-command", "--help"],
    ],
)
def test_the_check_rejects_bad_command_lines(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    with pytest.raises((pytest.fail.Exception, AssertionError)):
        check_command(parser, argv, "t")


# ── every file parses; every command line parses ────────────────────────────────────────────────


def test_deploy_has_the_promised_files() -> None:
    names = {_rel(p) for p in [*YAML_FILES, *DOCKERFILES]}
    assert {
        "deploy/docker/Dockerfile.cpu",
        "deploy/docker/Dockerfile.cuda",
        "deploy/kuberay/raycluster.yaml",
        "deploy/kuberay/rayjob-clean.yaml",
        "deploy/kuberay/serve.yaml",
        "deploy/kuberay/storage.yaml",
        "deploy/cluster/capfilt-aws.yaml",
    } <= names
    assert (DEPLOY / "README.md").is_file() and DOCS.is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path: Path) -> None:
    docs = _yaml_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{_rel(path)}: an empty or non-mapping document"


def test_every_capfilt_command_in_deploy_parses(parser: argparse.ArgumentParser) -> None:
    commands = deploy_commands()
    for command in commands:
        check_command(parser, command.argv, command.where)
    by_file: dict[str, set[str]] = {}
    for c in commands:
        by_file.setdefault(c.where.split(":")[0], set()).add(c.argv[0] if c.argv else "")
    # the places that must hold a command: a test that finds nothing checks nothing
    assert "clean" in by_file["deploy/kuberay/rayjob-clean.yaml"]
    assert "serve" in by_file["deploy/kuberay/serve.yaml"]
    assert "clean" in by_file["deploy/cluster/capfilt-aws.yaml"]  # the usage comment
    assert (
        "--help" in by_file["deploy/docker/Dockerfile.cpu"]
        and "--help" in by_file["deploy/docker/Dockerfile.cuda"]
    )


def test_every_capfilt_command_in_the_operations_guide_parses(parser: argparse.ArgumentParser) -> None:
    commands = markdown_commands(DOCS.read_text(), _rel(DOCS))
    for command in commands:
        check_command(parser, command.argv, command.where)
    shown = {c.argv[0] for c in commands if c.argv}
    assert {"clean", "convert", "train", "bootstrap", "caption", "score", "data", "serve"} <= shown


@pytest.mark.parametrize("path", MARKDOWN, ids=_rel)
def test_flags_named_in_prose_exist(parser: argparse.ArgumentParser, path: Path) -> None:
    """Inline code in the text: `capfilt SUB --flag ...` names flags of SUB, and a lone `--flag`
    names a flag of some capfilt command (other tools' flags are written with the tool's name)."""
    prose = _FENCE.sub("", path.read_text())
    every = _options(parser, recursive=True)
    spans = re.findall(r"`([^`\n]+)`", prose)
    for span in spans:
        words = [w for w in span.split() if w != "..."]
        if not words:
            continue
        if words[0] == "capfilt":
            sub, rest = _resolve(parser, words[1:])
            assert sub is not parser or not rest or rest[0].startswith("-"), f"{_rel(path)}: `{span}`"
            flags = {w.split("=")[0] for w in rest if w.startswith("--")}
            assert flags <= _options(sub), f"{_rel(path)}: `{span}` names {sorted(flags - _options(sub))}"
        elif words[0].startswith("--"):
            assert words[0].split("=")[0] in every, f"{_rel(path)}: `{span}` is no capfilt flag"
    assert any(s.startswith("--") for s in spans) or path != DOCS


def test_python_snippets_in_the_guide_compile_and_import() -> None:
    snippets = [body for lang, body in markdown_blocks(DOCS.read_text()) if lang == "python"]
    assert snippets
    for body in snippets:
        tree = ast.parse(body)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("capfilt"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"


def test_the_guide_names_real_metrics_reasons_and_the_key_variable() -> None:
    from prometheus_client import CollectorRegistry

    from capfilt.decision import REASONS
    from capfilt.services.metrics import HttpMetrics, ServiceCollector
    from capfilt.services.serve_cli import API_KEY_ENV

    registry = CollectorRegistry()
    HttpMetrics(registry)
    registry.register(ServiceCollector(None, None))
    metrics = {m.name for m in registry.collect()}
    suffixes = ("", "_total", "_bucket", "_sum", "_count", "_created")
    text = DOCS.read_text()
    named = set(re.findall(r"\bcapfilt_[a-z_]+\b", text))
    assert named, "the guide names no metric"
    for name in named:
        assert any(name == m + s for m in metrics for s in suffixes), f"no metric {name}; there are {metrics}"
    for metric in metrics:
        assert metric in text, f"the guide does not describe {metric}"
    for reason in REASONS:
        assert f"`{reason}`" in text
    assert API_KEY_ENV in text


# ── images ──────────────────────────────────────────────────────────────────────────────────────


def _from_image(text: str) -> str:
    """The image of the first FROM, with the ARG defaults declared before it substituted."""
    args: dict[str, str] = {}
    for op, rest in dockerfile_instructions(text):
        if op == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
        elif op == "FROM":
            image = rest.split()[0]
            return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], image)
    raise AssertionError("no FROM")


@pytest.mark.parametrize("path", DOCKERFILES, ids=_rel)
def test_images_start_from_the_ray_we_run(path: Path) -> None:
    image = _from_image(path.read_text())
    kind = r"cpu" if path.name.endswith(".cpu") else r"cu12\d"
    assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+-{kind}", image), image


def test_images_use_one_python() -> None:
    tags = {re.search(r"-(py3\d+)-", _from_image(p.read_text())).group(1) for p in DOCKERFILES}  # type: ignore[union-attr]
    everywhere = set(
        re.findall(r"rayproject/ray:[\w.]+-(py3\d+)-", "".join(p.read_text() for p in YAML_FILES))
    )
    assert len(tags | everywhere) == 1, tags | everywhere


@pytest.mark.parametrize("path", DOCKERFILES, ids=_rel)
def test_images_are_non_root_and_hold_only_sources(path: Path) -> None:
    tomllib = pytest.importorskip("tomllib")
    instructions = dockerfile_instructions(path.read_text())
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    sources = {
        s
        for op, rest in instructions
        if op in ("COPY", "ADD")
        for s in [w for w in rest.split() if not w.startswith("--")][:-1]
    }
    package_dirs = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    )
    assert sources == package_dirs | {"pyproject.toml", "README.md"}, (
        "copy the package's sources, nothing else"
    )
    ignore_file = (path.parent / f"{path.name}.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in ignore_file if line.strip() and not line.strip().startswith("#")]
    assert ignore[0] == "*", "the ignore file is an allow-list: everything out, then the sources in"
    for weights in ("**/*.safetensors", "**/*.pth", "**/*.bin"):
        assert weights in ignore
    pins = dict(re.findall(r"ARG (\w+_VERSION)=(\S+)", path.read_text()))
    assert pins["RAY_VERSION"] == RAY_VERSION and pins["TORCH_VERSION"] == TORCH_VERSION
    assert 'ray[default,data,train]==${RAY_VERSION}"' in path.read_text(), (
        "pip must not replace the image's Ray"
    )


def test_every_ray_and_torch_pin_in_deploy_and_docs_is_the_one_we_run() -> None:
    text = "".join(p.read_text() for p in [*YAML_FILES, *DOCKERFILES, *MARKDOWN])
    rays = re.findall(r"rayproject/ray:(\d[\w.]*)-py", text) + re.findall(r"ray\[[\w,]+\]==(\d[\w.]*)", text)
    rays += re.findall(r"rayVersion: \"?([\w.]+)", text)
    torches = re.findall(r"\btorch==(\d[\w.]*)", text)
    assert rays and torches
    assert set(rays) == {RAY_VERSION}, rays
    assert set(torches) == {TORCH_VERSION}, torches


# ── KubeRay ─────────────────────────────────────────────────────────────────────────────────────


def _objects() -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((DEPLOY / "kuberay").glob("*.yaml")):
        for doc in _yaml_docs(path):
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


@pytest.fixture(scope="module")
def k8s() -> dict[str, list[dict[str, Any]]]:
    return _objects()


def _one(k8s: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    assert len(k8s.get(kind, [])) == 1, f"expected one {kind}"
    return k8s[kind][0]


def test_kinds_and_api_versions(k8s: dict[str, list[dict[str, Any]]]) -> None:
    expected = {
        "RayCluster": "ray.io/v1",
        "RayJob": "ray.io/v1",
        "Deployment": "apps/v1",
        "Service": "v1",
        "PersistentVolumeClaim": "v1",
    }
    assert set(k8s) == set(expected)
    for kind, objects in k8s.items():
        for obj in objects:
            assert obj["apiVersion"] == expected[kind], f"{kind} {obj['metadata']['name']}"
            assert obj["metadata"]["name"]


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _pod_specs(k8s: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    cluster, job, serve = _one(k8s, "RayCluster"), _one(k8s, "RayJob"), _one(k8s, "Deployment")
    specs = [("head", cluster["spec"]["headGroupSpec"]["template"]["spec"])]
    specs += [(g["groupName"], g["template"]["spec"]) for g in cluster["spec"]["workerGroupSpecs"]]
    specs += [
        ("submitter", job["spec"]["submitterPodTemplate"]["spec"]),
        ("serve", serve["spec"]["template"]["spec"]),
    ]
    return specs


def test_container_fields_kubernetes_wants_as_strings_are_strings(
    k8s: dict[str, list[dict[str, Any]]],
) -> None:
    """`args: [--port, 8000]` would reach the API server as a number and be refused."""
    for name, spec in _pod_specs(k8s):
        for container in spec.get("initContainers", []) + spec["containers"]:
            for item in container.get("command", []) + container.get("args", []):
                assert isinstance(item, str), f"{name}/{container['name']}: {item!r}"
            for env in container.get("env", []):
                assert "value" not in env or isinstance(env["value"], str), f"{name}: {env}"


def test_raycluster_has_a_head_a_cpu_and_a_gpu_worker_group(k8s: dict[str, list[dict[str, Any]]]) -> None:
    spec = _one(k8s, "RayCluster")["spec"]
    assert spec["rayVersion"] == RAY_VERSION
    head = spec["headGroupSpec"]
    head_container = head["template"]["spec"]["containers"][0]
    assert _gpus(head_container) == 0 and head_container["image"].endswith("-cpu")
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert {"gcs-server", "dashboard", "client"} <= set(ports)
    groups = spec["workerGroupSpecs"]
    cpu = [g for g in groups if _gpus(g["template"]["spec"]["containers"][0]) == 0]
    gpu = [g for g in groups if _gpus(g["template"]["spec"]["containers"][0]) > 0]
    assert cpu and gpu, "a CPU worker group and a GPU worker group"
    for group in gpu:
        container = group["template"]["spec"]["containers"][0]
        assert container["image"].endswith("-cuda")
        requested = container["resources"].get("requests", {}).get("nvidia.com/gpu")
        assert requested in (None, container["resources"]["limits"]["nvidia.com/gpu"]), (
            "GPU requests = limits"
        )
    for group in cpu:
        assert group["template"]["spec"]["containers"][0]["image"].endswith("-cpu")
    for group in [head, *groups]:  # KubeRay's rayStartParams is map[string]string
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), group
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


def test_rayjob_runs_capfilt_clean_on_the_cluster(
    k8s: dict[str, list[dict[str, Any]]], parser: argparse.ArgumentParser
) -> None:
    job, cluster = _one(k8s, "RayJob"), _one(k8s, "RayCluster")
    spec = job["spec"]
    assert spec["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    [command] = shell_commands(spec["entrypoint"], "RayJob.entrypoint")
    args = check_command(parser, command.argv, command.where)
    assert args is not None and args.command == "clean"
    assert args.resume, "the RayJob passes --resume so that a rerun continues the job"
    # what the REST service lists and reads progress from
    assert spec["metadata"] == {"capfilt": "clean", "output": args.output}


def test_serve_reaches_the_cluster_and_keeps_its_key_in_a_secret(
    k8s: dict[str, list[dict[str, Any]]], parser: argparse.ArgumentParser
) -> None:
    from capfilt.services.serve_cli import API_KEY_ENV

    cluster, deployment, service = _one(k8s, "RayCluster"), _one(k8s, "Deployment"), _one(k8s, "Service")
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    [command] = list_commands([*container["command"], *container["args"]], "serve")
    args = check_command(parser, command.argv, command.where)
    assert args is not None and args.command == "serve"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    head_svc = f"{cluster['metadata']['name']}-head-svc"
    assert args.ray_address == f"ray://{head_svc}:{ports['client']}"
    assert args.dashboard_url == f"http://{head_svc}:{ports['dashboard']}"
    assert args.host == "0.0.0.0" and args.api_key_file is None
    assert args.input_root and args.output_root, "jobs are enabled"
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env[API_KEY_ENV]["valueFrom"], "the API key comes from a Secret"
    assert container["image"] == head["image"], "the service runs the cluster's Ray and Python"
    # the Service sends traffic to the port the service listens on
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    [port] = service["spec"]["ports"]
    assert named[port["targetPort"]] == args.port
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # the probes ask the service's own routes
    from capfilt.services.routes_health import router

    routes = {r.path for r in router.routes}
    assert container["readinessProbe"]["httpGet"]["path"] in routes
    assert container["livenessProbe"]["httpGet"]["path"] in routes


def test_every_pod_mounts_the_shared_volume_and_every_path_is_on_it(
    k8s: dict[str, list[dict[str, Any]]], parser: argparse.ArgumentParser
) -> None:
    pvc = _one(k8s, "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    mounts = set()
    for name, spec in _pod_specs(k8s):
        if name == "submitter":  # only runs `ray job submit`
            continue
        volumes = {
            v["name"]
            for v in spec["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
        }
        assert volumes, f"{name} does not mount {pvc['metadata']['name']}"
        for container in spec["containers"]:
            mounts |= {m["mountPath"] for m in container["volumeMounts"] if m["name"] in volumes}
    assert len(mounts) == 1, f"one mount path everywhere: {mounts}"
    [root] = mounts
    paths = []
    for command in [c for c in deploy_commands() if "kuberay" in c.where]:
        args = check_command(parser, command.argv, command.where)
        if args is None:
            continue
        for option in ("input", "human", "output", "captioner", "filter", "input_root", "output_root"):
            value = getattr(args, option, None)
            paths += value if isinstance(value, list) else [value] if value else []
    assert paths
    for path in paths:
        assert Path(path).is_relative_to(root), f"{path} is not on the shared volume {root}"


def test_every_ray_client_and_node_uses_one_ray_token_and_runs_as_non_root(
    k8s: dict[str, list[dict[str, Any]]],
) -> None:
    tokens = set()
    for name, spec in _pod_specs(k8s):
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, name
        for container in spec["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", name
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            tokens.add((ref["name"], ref["key"]))
    assert len(tokens) == 1, tokens


# ── the Ray cluster launcher ────────────────────────────────────────────────────────────────────


def test_cluster_launcher_config_is_valid_and_has_cpu_and_gpu_node_types() -> None:
    [config] = _yaml_docs(DEPLOY / "cluster" / "capfilt-aws.yaml")
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # moved: check against the schema file it reads
        import jsonschema

        schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
        jsonschema.validate(config, schema)
    else:
        validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does first
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    images = {
        name: t.get("docker", {}).get("worker_image", config["docker"]["image"]) for name, t in types.items()
    }
    workers = [n for n in types if n != config["head_node_type"]]
    gpu = [n for n in workers if re.search(r"-cu\d+$", images[n])]
    cpu = [n for n in workers if images[n].endswith("-cpu")]
    assert gpu and cpu, images
    for name in gpu:  # node-type setup commands replace the global ones: CUDA torch there
        setup = " ".join(types[name]["worker_setup_commands"])
        assert "torch==" in setup and "whl/cpu" not in setup and "~/capfilt-src" in setup
    setup = " ".join(config["setup_commands"])
    assert "whl/cpu" in setup and "~/capfilt-src" in setup
    assert "~/capfilt-src" in config["file_mounts"]
    for image in [*images.values(), config["docker"]["head_image"]]:
        assert image.startswith(f"rayproject/ray:{RAY_VERSION}-"), image
