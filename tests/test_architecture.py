"""The package's shape (docs/architecture.md): imports point down the layers only, the ground layer
imports nothing of forgetkern, importing forgetkern or forgetkern.optim pulls in no Triton, and no
non-kernel module grows past ~400 lines."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import forgetkern

PACKAGE = Path(forgetkern.__file__).parent

# Layer of every top-level module or subpackage of forgetkern; an import may only go to a lower
# layer, or sideways within a layer along SIDEWAYS.
LAYERS = {
    "_params": 0, "_version": 0, "_files": 0, "_args": 0,
    "_validate": 1, "_backend": 1, "_chunked": 1, "reference": 1, "ops": 1, "_cuda": 1,
    "_cuda_emulated": 1, "distributed": 1, "_rank_check": 1, "data_parallel": 1,
    "_partials": 1,
    "_autograd": 2, "functional": 2, "nn": 2, "_info": 2,
    "lora": 3, "optim": 3, "train": 3, "cache": 3, "models": 3, "modeling": 3,
    "integrations": 4, "demo": 4, "_bench": 4, "cli": 4, "__main__": 5, "__init__": 5,
}
SIDEWAYS = {
    ("_backend", "_cuda"),  # the table asks the extension loader whether it is built
    ("_backend", "_chunked"),  # the fused-linear ops: the chunked driver over a logits op
    ("_backend", "reference"), ("_backend", "ops"),  # the table's implementations, by module name
    ("_cuda_emulated", "_cuda"),  # the CUDA backend's interfaces over the host emulation
    ("distributed", "_backend"),  # vocab-parallel: the selected backend's tmkl kernels per shard
    ("distributed", "_validate"), ("distributed", "_rank_check"),  # its one entry: checks, ranks
    ("distributed", "_chunked"),  # ... with the chunked driver's GEMMs and chunk sizes
    ("distributed", "data_parallel"),  # re-exports the data-parallel helpers under their old home
    ("ops", "_partials"), ("distributed", "_partials"),  # the one merge of vocabulary parts
    ("_autograd", "_backend"),  # only the Implementation type
    ("optim", "lora"),  # optimizers find the LoRA layers
    ("train", "lora"),
    ("modeling", "lora"),  # adapters off for the base side; LoRA heads
    ("train", "modeling"), ("cache", "modeling"),  # batches, labels, hidden states and the head
    ("cache", "train"), ("cache", "lora"),  # the cache pass runs the model as training does
    ("cache", "optim"),  # only the progress bar
    ("cache", "models"),  # cache-base --model smollm2
    ("demo", "integrations"),
    ("cli", "demo"), ("cli", "_bench"),
    ("functional", "_autograd"), ("nn", "functional"), ("_info", "_backend"), ("_info", "_cuda"),
}
NON_KERNEL_LINE_LIMIT = 400
KERNEL_MODULES = {"ops"}  # Triton kernel files carry long kernel bodies


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield rel, path


def _top(rel: Path) -> str:
    return rel.parts[0].removesuffix(".py")


def _is_module(name: str) -> bool:
    """Whether ``name`` (a top-level name under forgetkern) is one of its Python modules."""
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name / "__init__.py").is_file()


def _imports(rel: Path, path: Path):
    """Top-level forgetkern names imported by the module (module-level and in functions), and those
    it names as module strings (``"forgetkern.ops.tmkl"``: the dispatch table's implementations,
    imported lazily by ``importlib``) -- an edge all the same."""
    tree = ast.parse(path.read_text())
    package = ["forgetkern", *rel.parts[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            parts = node.value.split(".")
            if (len(parts) > 1 and parts[0] == "forgetkern" and all(p.isidentifier() for p in parts)
                    and _is_module(parts[1])):
                yield node.lineno, parts[1]
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                targets = [name] if node.module else [f"{name}.{a.name}" for a in node.names]
            else:
                targets = [node.module or ""]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            if parts[0] != "forgetkern":
                continue
            yield node.lineno, parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    missing = sorted({_top(rel) for rel, _ in _modules()} - set(LAYERS))
    assert not missing, f"modules without a layer in tests/test_architecture.py: {missing}"


def test_imports_point_down_only():
    upward = []
    for rel, path in _modules():
        src = _top(rel)
        for line, dst in _imports(rel, path):
            if dst == src:
                continue
            if LAYERS[dst] < LAYERS[src] or (src, dst) in SIDEWAYS:
                continue
            upward.append(f"{rel}:{line} imports forgetkern.{dst} "
                          f"(layer {LAYERS[src]} -> {LAYERS[dst]})")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_ground_layer_and_reference_import_no_kernels():
    for rel, path in _modules():
        src = _top(rel)
        names = {dst for _, dst in _imports(rel, path)} - {src}
        if src == "_params":
            assert not names, f"the ground layer imports {names}"
        if src == "_chunked":  # the driver gets its per-chunk kernels as an argument
            assert names <= {"_params"}, f"the chunked driver imports {names}"
        if src in ("reference", "_validate", "_cuda") or (src == "ops"):
            allowed = {src} | {d for s, d in SIDEWAYS if s == src}  # listed, with the reason
            assert not names & {"ops", "reference", "_cuda", "_validate", "_backend"} - allowed, (
                f"{rel} imports a sibling of its layer: {names}")


def test_import_detects_an_upward_import(tmp_path):
    """The checker itself: a ground-layer module importing ops is reported."""
    bad = tmp_path / "_params.py"
    bad.write_text("from .ops import tmkl\n")
    assert list(_imports(Path("_params.py"), bad)) == [(1, "ops")]


def test_dispatch_table_module_strings_are_edges(tmp_path):
    """A table that names an implementation by module string imports it (lazily): a layer-1 table
    naming a layer-2 module is reported, and the real table's strings are all read."""
    bad = tmp_path / "_backend.py"
    bad.write_text('TABLE = {("tmkl", "reference"): ("forgetkern.functional", ("f",))}\n')
    assert list(_imports(Path("_backend.py"), bad)) == [(1, "functional")]
    from forgetkern import _backend

    named = {m.split(".")[1] for m, _ in _backend.TABLE.values()} | {
        m.split(".")[1] for m in _backend.HOMES.values()}
    edges = {dst for _, dst in _imports(Path("_backend.py"), PACKAGE / "_backend.py")}
    assert named <= edges, named - edges


@pytest.mark.parametrize("module", ["forgetkern", "forgetkern.optim", "forgetkern.lora"])
def test_import_leaves_triton_out(module):
    code = (f"import sys, torch, {module}; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'cuda initialized'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_non_kernel_module_over_the_limit():
    long = []
    for rel, path in _modules():
        if _top(rel) in KERNEL_MODULES:
            continue
        lines = len(path.read_text().splitlines())
        if lines > NON_KERNEL_LINE_LIMIT:
            long.append(f"{rel}: {lines} lines")
    assert not long, "modules over the limit: " + ", ".join(long)
