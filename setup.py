"""Build script for forgetkern.

Metadata lives in pyproject.toml. This file exists for the compiled parts of the package, which
are built without importing torch (so ``pip install`` never needs torch at build time).

The CUDA extension ``forgetkern._C`` (sources in ``csrc/``) is compiled with nvcc whenever nvcc is
found (``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, ``PATH`` or ``/usr/local/cuda/bin``); a compile error
fails the build.
Environment:

* ``FORGETKERN_SKIP_CUDA_BUILD=1``: do not build the extension (pure-Python install).
* ``FORGETKERN_CUDA_ARCHS``: GPU architectures, ``;``/``,``/space separated (default ``80;90``);
  SASS for each, plus PTX of the highest for newer GPUs.
* ``MAX_JOBS``: parallel compile jobs (default: the number of CPUs).
* ``FORGETKERN_PTXAS_VERBOSE=1``: print ptxas register/spill reports.

pybind11 comes from the ``pybind11`` package (a build requirement), or from the headers bundled
with an installed torch (found on disk, never imported); ninja is used when available.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
CUDA_SOURCES = ["tmkl_forward.cu", "tmkl_backward.cu", "generalized_eigh.cu", "runtime.cu", "bindings.cpp"]
DEFAULT_ARCHS = "80;90"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/bin, $CUDA_PATH/bin, PATH or /usr/local/cuda/bin, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            candidate = os.path.join(home, "bin", "nvcc")
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"  # the toolkit's default location, often not on PATH
    return default if os.path.isfile(default) and os.access(default, os.X_OK) else None


def cuda_archs() -> list[str]:
    """Architectures from FORGETKERN_CUDA_ARCHS: '80;90', '8.0 9.0', 'sm_90a' all work."""
    raw = os.environ.get("FORGETKERN_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
    archs = []
    for item in re.split(r"[;,\s]+", raw):
        item = item.strip().lower()
        if not item:
            continue
        item = re.sub(r"^(sm_|compute_)", "", item).replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", item):
            raise SystemExit(f"FORGETKERN_CUDA_ARCHS: cannot parse architecture {item!r} in {raw!r}")
        if item not in archs:
            archs.append(item)
    if not archs:
        raise SystemExit(f"FORGETKERN_CUDA_ARCHS is empty ({raw!r})")
    return sorted(archs, key=lambda a: (int(re.match(r"\d+", a).group()), a))


def gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    top = archs[-1]
    flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


def pybind11_include() -> str:
    """pybind11 headers: the pybind11 package, else the copy bundled with torch (not imported)."""
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        pass
    spec = importlib.util.find_spec("torch")
    for location in (spec.submodule_search_locations or []) if spec else []:
        include = os.path.join(location, "include")
        if os.path.isfile(os.path.join(include, "pybind11", "pybind11.h")):
            return include
    raise SystemExit(
        "building forgetkern._C needs pybind11 (pip install pybind11), "
        "or set FORGETKERN_SKIP_CUDA_BUILD=1 to skip the CUDA extension"
    )


def find_ninja() -> str | None:
    try:
        import ninja

        candidate = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(candidate):
            return candidate
    except ImportError:
        pass
    return shutil.which("ninja")


def max_jobs() -> int:
    value = os.environ.get("MAX_JOBS", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise SystemExit(f"MAX_JOBS must be an integer, got {value!r}") from None
    return max(1, os.cpu_count() or 1)


class CUDAExtension(Extension):
    """An extension compiled by nvcc (see BuildExt)."""


class BuildExt(build_ext):
    """Builds CUDAExtension with nvcc (through ninja when available); others as usual."""

    def build_extension(self, ext):
        if not isinstance(ext, CUDAExtension):
            return super().build_extension(ext)
        nvcc = find_nvcc()
        archs = cuda_archs()
        out = os.path.abspath(self.get_ext_fullpath(ext.name))
        tmp = os.path.abspath(os.path.join(self.build_temp, "forgetkern_cuda"))
        os.makedirs(tmp, exist_ok=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(os.path.join(tmp, "build_info.h.new"), "w") as f:
            f.write(f'#define FORGETKERN_CUDA_ARCHS "{";".join(archs)}"\n')
        _replace_if_changed(os.path.join(tmp, "build_info.h"))

        common = ["-std=c++17", "-O3", "-DNDEBUG", "-Xcompiler", "-fPIC,-fvisibility=hidden",
                  f"-I{CSRC}", f"-I{tmp}"]
        cu_flags = common + ["-lineinfo", "--threads", "1"] + gencode_flags(archs)
        if _env_flag("FORGETKERN_PTXAS_VERBOSE"):
            cu_flags += ["-Xptxas", "-v"]
        py_includes = {sysconfig.get_paths()["include"], sysconfig.get_paths()["platinclude"]}
        cxx_flags = common + [f"-I{pybind11_include()}"] + [f"-I{p}" for p in sorted(py_includes)]
        cxx_flags += ["-include", "build_info.h"]
        # static CUDA runtime (imports without a driver); its symbols stay private to _C so they
        # never bind to torch's libcudart
        link_flags = ["-shared", "-cudart", "static", "-Xlinker", "--exclude-libs,ALL"]

        objects = []
        compiles = []
        for source in ext.sources:
            src = os.path.join(HERE, source)
            obj = os.path.join(tmp, os.path.basename(source) + ".o")
            flags = cu_flags if source.endswith(".cu") else cxx_flags
            compiles.append((src, obj, flags))
            objects.append(obj)
        print(f"forgetkern: building {ext.name} with {nvcc} for sm_{', sm_'.join(archs)} "
              f"(+PTX {archs[-1]}), {max_jobs()} job(s)")
        ninja = find_ninja()
        if ninja:
            self._build_ninja(ninja, nvcc, tmp, compiles, objects, out, link_flags)
        else:
            self._build_direct(nvcc, compiles, objects, out, link_flags)

    @staticmethod
    def _build_ninja(ninja, nvcc, tmp, compiles, objects, out, link_flags):
        q = shlex.quote
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {q(nvcc)}",
            "rule compile",
            "  command = $nvcc $flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = NVCC $out",
            "rule link",
            "  command = $nvcc $in -o $out $flags",
            "  description = LINK $out",
        ]
        for src, obj, flags in compiles:
            lines.append(f"build {_ninja_path(obj)}: compile {_ninja_path(src)}")
            lines.append(f"  flags = {' '.join(q(f) for f in flags)}")
        lines.append(f"build {_ninja_path(out)}: link {' '.join(_ninja_path(o) for o in objects)}")
        lines.append(f"  flags = {' '.join(q(f) for f in link_flags)}")
        lines.append(f"default {_ninja_path(out)}")
        build_file = os.path.join(tmp, "build.ninja")
        with open(build_file + ".new", "w") as f:
            f.write("\n".join(lines) + "\n")
        _replace_if_changed(build_file)
        _run([ninja, "-f", build_file, "-j", str(max_jobs()), "-v"], cwd=tmp)

    @staticmethod
    def _build_direct(nvcc, compiles, objects, out, link_flags):
        commands = [[nvcc, *flags, "-c", src, "-o", obj] for src, obj, flags in compiles]
        with ThreadPoolExecutor(max_workers=max_jobs()) as pool:
            for future in [pool.submit(_run, cmd) for cmd in commands]:
                future.result()
        _run([nvcc, *objects, "-o", out, *link_flags])


def _ninja_path(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _replace_if_changed(path: str) -> None:
    """Move path + '.new' over path unless identical (keeps ninja's timestamps meaningful)."""
    new = path + ".new"
    if os.path.exists(path):
        with open(path) as a, open(new) as b:
            if a.read() == b.read():
                os.remove(new)
                return
    os.replace(new, path)


def _run(cmd, cwd=None):
    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    result = subprocess.run(cmd, cwd=cwd)
    if result.returncode != 0:
        raise SystemExit(f"forgetkern: building the CUDA extension failed (exit {result.returncode}): "
                         f"{shlex.join(cmd[:2])} ...; set FORGETKERN_SKIP_CUDA_BUILD=1 to skip it")


def extensions():
    if _env_flag("FORGETKERN_SKIP_CUDA_BUILD"):
        print("forgetkern: FORGETKERN_SKIP_CUDA_BUILD is set; not building the CUDA extension")
        return []
    if find_nvcc() is None:
        print("forgetkern: nvcc not found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda); "
              "not building the CUDA extension")
        return []
    return [CUDAExtension("forgetkern._C", sources=[f"csrc/{s}" for s in CUDA_SOURCES])]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
