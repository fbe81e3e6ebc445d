#!/usr/bin/env python
"""Mutation testing of the modules the supervisor rebuild must not break (issue 8).

For each mutant of a listed module: write it into a private copy of the tree, run the fast test
files mapped to that module (``pytest -x``, with a time limit), record killed or survived, restore
the original. Workers are spawned from the package's own location, so tests that start real
supervisors and worker subprocesses exercise the mutant too (mutmut's trampolines, which live in
the test process, do not reach them; see README, "Development").

Mutants come from two sources:
* generated (AST) inside the listed functions: flip bool constants; ``<``/``<=``, ``>``/``>=``,
  ``==``/``!=``, ``is``/``is not``, ``in``/``not in``; int constant +1/-1; ``and``/``or``; ``+``/``-``;
  drop a ``not``; an ``if``/``while``/comprehension guard forced True or False; a statement
  removed (call, assignment, raise, continue/break); a return value replaced by None;
* named (scripts/mutants_named.txt): the hand-made mutants of issue 8, as text patches.

Mutants listed in scripts/mutants_equivalent.txt (key, then the reason) are left out of the score.

    python scripts/mutate.py                 # everything, 2 jobs
    python scripts/mutate.py -m policy -j 1  # targets whose name contains "policy"
    python scripts/mutate.py --list          # print the mutants, run nothing
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures as cf
import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

# name -> (module path, functions to mutate (qualified names; empty = the whole module), fast test files)
UNIT_PROTOCOL = ["tests/test_unit_protocol.py", "tests/test_unit_parts.py",
                 "tests/test_package.py::test_supervisor_imports_no_model_runtime_nor_numpy"]
UNIT_REQUESTS = ["tests/test_unit_requests.py"]
TARGETS: dict[str, tuple[str, list[str], list[str]]] = {
    "protocol.errors": ("akidb_embed/protocol/errors.py", [], UNIT_PROTOCOL),
    "protocol.codec": ("akidb_embed/protocol/codec.py", [], UNIT_PROTOCOL + ["tests/test_unit_loop.py"]),
    "protocol.messages": ("akidb_embed/protocol/messages.py", [], UNIT_PROTOCOL),
    "supervisor.policy": ("akidb_embed/supervisor/policy.py", [], ["tests/test_unit_policy.py"]),
    "supervisor.requests": ("akidb_embed/supervisor/requests.py", [], UNIT_REQUESTS),
    "supervisor.quarantine": ("akidb_embed/supervisor/quarantine.py", [], UNIT_REQUESTS),
    "supervisor.scheduler": ("akidb_embed/supervisor/scheduler.py", [], UNIT_REQUESTS + [
        "tests/test_behaviour.py::test_max_queue_is_the_exact_number_of_waiting_requests",
        "tests/test_review_regressions.py::test_timed_out_requests_free_their_place_in_the_queue"]),
    "supervisor.fairqueue": ("akidb_embed/supervisor/fairqueue.py", [], ["tests/test_unit_fairqueue.py"]),
    "supervisor.passes": ("akidb_embed/supervisor/passes.py", [], ["tests/test_unit_passes.py"]),
    "supervisor.jobs": ("akidb_embed/supervisor/jobs.py", [], ["tests/test_unit_parts.py"] + UNIT_REQUESTS),
    "workers.batching": ("akidb_embed/workers/batching.py", [], ["tests/test_batching.py"]),
    "workers.loop": ("akidb_embed/workers/loop.py", ["Worker._serve_once", "Worker._accept", "Worker._process",
                                                     "Worker._prepare", "Worker._token_counts", "Worker._run_group",
                                                     "Worker._group_failed", "Worker._store", "Worker._reply_ok",
                                                     "Worker._reply_error", "Worker._job_tokens", "Worker._flush"],
                     ["tests/test_unit_loop.py"]),
    "client.ids": ("akidb_embed/client.py", ["Client._call", "AsyncClient._read", "AsyncClient._call"],
                   ["tests/test_unit_client_ids.py",   # + the blocking wait noticing a lost server (real processes)
                    "tests/test_supervision.py::test_blocking_call_on_a_killed_server_fails_fast_and_the_client_reconnects"]),
}


@dataclass
class Mutant:
    target: str
    path: str
    key: str             # stable-ish id: path:line:col:operator
    describe: str
    source: str          # the whole mutated module
    tests: list[str]
    named: bool = False


# ---- generation -----------------------------------------------------------------------------------

def _functions(tree: ast.Module, names: list[str]) -> list[ast.AST]:
    if not names:
        return [tree]
    found: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{node.name}.{sub.name}"] = sub
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"functions not found: {missing}")
    return [found[n] for n in names]


def _skipped(tree: ast.Module) -> set[int]:
    """Nodes not worth mutating: docstrings, logging calls, type annotations (ids of ast nodes)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.update(id(n) for n in ast.walk(first))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name) and node.func.value.id == "log":
            skip.update(id(n) for n in ast.walk(node))
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and \
                isinstance(node.value.func, ast.Attribute) and isinstance(node.value.func.value, ast.Name) and \
                node.value.func.value.id == "log":
            skip.add(id(node))
        for ann in [getattr(node, "annotation", None), getattr(node, "returns", None)]:
            if ann is not None:
                skip.update(id(n) for n in ast.walk(ann))
        if isinstance(node, ast.JoinedStr):   # message text
            skip.update(id(n) for n in ast.walk(node))
    return skip


CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.Pow: ast.Mult}
REMOVABLE = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Raise, ast.Continue, ast.Break)


def _edits(node: ast.AST) -> list[tuple[str, Any]]:
    """(description, edit) pairs for one node; an edit is applied by _apply."""
    out: list[tuple[str, Any]] = []
    new: Any
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool):
            out.append((f"{node.value} -> {not node.value}", ("const", not node.value)))
        elif isinstance(node.value, int):
            out.append((f"{node.value} -> {node.value + 1}", ("const", node.value + 1)))
            out.append((f"{node.value} -> {node.value - 1}", ("const", node.value - 1)))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in CMP_SWAP:
                new = CMP_SWAP[type(op)]
                out.append((f"{type(op).__name__} -> {new.__name__}", ("cmp", i, new)))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f"{type(node.op).__name__} -> {new.__name__}", ("boolop", new)))
    elif isinstance(node, ast.BinOp) and type(node.op) in BIN_SWAP:
        new = BIN_SWAP[type(node.op)]
        out.append((f"{type(node.op).__name__} -> {new.__name__}", ("binop", new)))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        out.append(("drop not", ("dropnot",)))
    elif isinstance(node, (ast.If, ast.While)):
        kind = type(node).__name__.lower()
        out.append((f"{kind} guard -> True", ("test", True)))
        out.append((f"{kind} guard -> False", ("test", False)))
    elif isinstance(node, ast.comprehension) and node.ifs:
        out.append(("comprehension filter -> True", ("ifs", True)))
        out.append(("comprehension filter -> False", ("ifs", False)))
    if isinstance(node, REMOVABLE):
        out.append((f"remove {type(node).__name__.lower()}", ("remove",)))
    if isinstance(node, ast.Return) and node.value is not None and not (
            isinstance(node.value, ast.Constant) and node.value.value is None):
        out.append(("return None", ("retnone",)))
    return out


class _Replace(ast.NodeTransformer):
    def __init__(self, target: Any, edit: Any) -> None:
        self.target: Any = target
        self.edit = edit

    def generic_visit(self, original: ast.AST) -> Any:
        node: Any = super().generic_visit(original)
        if node is not self.target:  # the one node to change
            return node
        kind = self.edit[0]
        if kind == "const":
            return ast.copy_location(ast.Constant(self.edit[1]), node)
        if kind == "cmp":
            node.ops[self.edit[1]] = self.edit[2]()
        elif kind in ("boolop", "binop"):
            node.op = self.edit[1]()
        elif kind == "dropnot":
            return node.operand
        elif kind == "test":
            node.test = ast.Constant(self.edit[1])
        elif kind == "ifs":
            node.ifs = [ast.Constant(self.edit[1])]
        elif kind == "remove":
            return ast.copy_location(ast.Pass(), node)
        elif kind == "retnone":
            node.value = ast.Constant(None)
        return node


def generate(name: str) -> list[Mutant]:
    path, funcs, tests = TARGETS[name]
    text = (ROOT / path).read_text()
    tree = ast.parse(text)
    skip = _skipped(tree)
    scopes = _functions(tree, funcs)
    nodes = [n for scope in scopes for n in ast.walk(scope) if id(n) not in skip]
    index = {id(n): i for i, n in enumerate(ast.walk(tree))}
    mutants = []
    for node in nodes:
        for describe, edit in _edits(node):
            fresh = ast.parse(text)
            target = list(ast.walk(fresh))[index[id(node)]]
            mutated = _Replace(target, edit).visit(copy.copy(fresh))
            ast.fix_missing_locations(mutated)
            where = node.ifs[0] if isinstance(node, ast.comprehension) else node   # a comprehension has no line
            line, col = getattr(where, "lineno", 0), getattr(where, "col_offset", 0)
            key = f"{path}:{line}:{col}:{describe}"
            snippet = text.splitlines()[line - 1].strip() if line else ""
            mutants.append(Mutant(name, path, key, f"{describe}  | {snippet[:90]}", ast.unparse(mutated), tests))
    return _unique(mutants)


def _unique(mutants: list[Mutant]) -> list[Mutant]:
    seen, out = set(), []
    original: dict[str, str] = {}
    for m in mutants:
        src = original.setdefault(m.path, ast.unparse(ast.parse((ROOT / m.path).read_text())))
        if m.source in seen or m.source == src:
            continue
        seen.add(m.source)
        out.append(m)
    return out


def named() -> list[Mutant]:
    """scripts/mutants_named.txt: blocks of `=== title | path | test files`, `---`, old text, `+++`, new text."""
    out = []
    text = (HERE / "mutants_named.txt").read_text()
    for block in ("\n" + text).split("\n=== ")[1:]:
        head, rest = block.split("\n", 1)
        title, path, tests = (part.strip() for part in head.split("|"))
        old, new = rest.split("\n+++\n", 1)
        old = old.split("---\n", 1)[1]
        new = new.rstrip("\n")
        source = (ROOT / path).read_text() if (ROOT / path).is_file() else ""
        found = source.count(old)
        key = f"named:{title}"
        if found != 1:
            out.append(Mutant("named", path, key, f"STALE: patch text found {found} times", "", tests.split(), True))
            continue
        out.append(Mutant("named", path, key, title, source.replace(old, new), tests.split(), True))
    return out


def equivalent() -> dict[str, str]:
    out = {}
    for line in (HERE / "mutants_equivalent.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, reason = line.partition(" # ")
            out[key.strip()] = reason.strip()
    return out


# ---- running --------------------------------------------------------------------------------------

def make_copy() -> Path:
    d = Path(tempfile.mkdtemp(prefix="akidb-mutate-"))
    for part in ("akidb_embed", "tests"):
        shutil.copytree(ROOT / part, d / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", d / "pyproject.toml")
    return d


def run_tests(tree: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree),
           "AKIDB_CACHE_DIR": os.environ.get("AKIDB_CACHE_DIR", str(ROOT / ".cache" / "models")),
           "HF_HUB_OFFLINE": "1"}
    t0 = time.monotonic()
    # its own process group: on a timeout the supervisors and workers the tests started go too
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                             *tests], cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "killed (timeout)", time.monotonic() - t0
    if proc.returncode == 0:
        return "survived", time.monotonic() - t0
    # 2 and 4: the mutant broke collection (an import fails, so a node id is not found); the unmutated
    # tree passed the same command, so that is the mutant's doing
    if proc.returncode in (1, 2, 3, 4) or proc.returncode < 0:
        return "killed", time.monotonic() - t0
    return f"error (pytest exit {proc.returncode})", time.monotonic() - t0


def run_one(tree: Path, m: Mutant, timeout: float) -> tuple[str, float]:
    if not m.source:
        return "stale", 0.0
    target = tree / m.path
    original = target.read_bytes()
    try:
        target.write_text(m.source)
        return run_tests(tree, m.tests, timeout)
    finally:
        target.write_bytes(original)
        # the mutant's bytecode must not be taken for the original's (same size, same mtime second)
        for pyc in (target.parent / "__pycache__").glob(target.stem + ".*.pyc"):
            pyc.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--match", default="", help="only targets whose name contains this ('named' for those)")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per mutant's test run")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every mutant's verdict")
    ap.add_argument("--keys", type=Path, help="run only the mutants whose keys this file lists (e.g. survivors)")
    args = ap.parse_args()
    mutants = [m for name in TARGETS if args.match in name for m in generate(name)]
    if args.match in ("", "named"):
        mutants += named()
    equiv = equivalent()
    if args.keys:
        wanted = {line.strip() for line in args.keys.read_text().splitlines() if line.strip()}
        mutants = [m for m in mutants if m.key in wanted]
    if args.list:
        for m in mutants:
            print(("EQUIV " if m.key in equiv else "") + m.key)
        print(f"{len(mutants)} mutants")
        return 0
    # sanity: the unmutated tree passes every mapped test file
    trees = [make_copy() for _ in range(max(1, args.jobs))]
    files = sorted({t for m in mutants for t in m.tests})
    verdict, secs = run_tests(trees[0], files, args.timeout * 4)
    if verdict != "survived":
        print(f"the unmutated tree fails its own tests ({verdict}): {' '.join(files)}")
        return 2
    print(f"{len(mutants)} mutants; baseline tests pass in {secs:.1f} s", flush=True)
    results: dict[str, tuple[Mutant, str]] = {}
    free = list(trees)

    def job(m: Mutant) -> tuple[Mutant, str, float]:
        tree = free.pop()
        try:
            return (m, *run_one(tree, m, args.timeout))
        finally:
            free.append(tree)

    try:
        with cf.ThreadPoolExecutor(len(trees)) as ex:
            for m, verdict, secs in ex.map(job, [m for m in mutants if m.key not in equiv]):
                results[m.key] = (m, verdict)
                if not verdict.startswith("killed") or args.verbose:
                    print(f"  {verdict.upper()} ({secs:.1f} s): {m.key}  [{m.describe}]", flush=True)
    finally:
        for tree in trees:
            shutil.rmtree(tree, ignore_errors=True)
    print("\nper target: killed / scored (equivalent excluded)")
    total_k = total_n = 0
    for name in [*TARGETS, "named"]:
        rows = [v for m, v in results.values() if m.target == name]
        n_eq = sum(1 for m in mutants if m.target == name and m.key in equiv)
        if not rows and not n_eq:
            continue
        k = sum(1 for v in rows if v.startswith("killed"))
        total_k, total_n = total_k + k, total_n + len(rows)
        print(f"  {name:20s} {k:4d} / {len(rows):4d}  {100 * k / max(1, len(rows)):5.1f} %   equivalent: {n_eq}")
    print(f"  {'total':20s} {total_k:4d} / {total_n:4d}  {100 * total_k / max(1, total_n):5.1f} %")
    named_left = [m.key for m, v in results.values() if m.named and not v.startswith("killed")]
    if named_left:
        print("named mutants NOT killed:", *named_left, sep="\n  ")
    return 0 if not named_left and total_k >= 0.9 * total_n else 1


if __name__ == "__main__":
    sys.exit(main())
