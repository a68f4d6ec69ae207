"""Build script for halb's optional compiled hot path. All metadata is in pyproject.toml.

The modules listed in ``halb/_ext.py`` (``COMPILED``) are compiled with Cython in pure Python
mode: the ``.py`` file is the source, a ``.pxd`` beside it (if any) adds C types. When Cython
or a C compiler is missing, or compiling fails, the build prints one warning and installs the
pure-Python package; ``HALB_NO_EXTENSIONS=1`` skips compiling. ``halb._ext.status()`` (and
``halbd --version``) tell which one a process runs.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

from importlib.machinery import EXTENSION_SUFFIXES

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
# (distutils' DistutilsExecError and DistutilsPlatformError, under setuptools' names)
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError

HERE = Path(__file__).resolve().parent
ENV = "HALB_NO_EXTENSIONS"

DIRECTIVES = {
    "language_level": "3",
    # The .py files' annotations (`why: int`) stay Python annotations; C types come only
    # from the .pxd files.
    "annotation_typing": False,
    # Kept ON, unlike the usual fast set: the .py files are ordinary Python that indexes lists
    # with -1 (`self.queue[-1]`), and with wraparound=False Cython reads ob_item[-1] of a list
    # at run time (halbd died with SIGSEGV on its first request); with boundscheck=False an
    # index past the end reads past the array instead of raising IndexError. A module whose
    # indexing has been checked for it can opt out with a first-line comment
    # `# cython: boundscheck=False, wraparound=False`.
    "boundscheck": True,
    "wraparound": True,
    "infer_types": True,
}


def compiled_modules() -> tuple[str, ...]:
    """halb._ext.COMPILED, read without importing halb (nor its dependencies)."""
    tree = ast.parse((HERE / "halb" / "_ext.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError("halb/_ext.py defines no COMPILED = (...)")


def warn(why: str) -> None:
    bar = "*" * 78
    sys.stderr.write(f"\n{bar}\nWARNING: halb's L7 hot path is NOT compiled: {why}.\n"
                     "Installing the pure-Python modules (correct, but slower). To compile: a C "
                     "compiler (gcc,\nlibc6-dev), Python's headers and Cython>=3; `./dev setup` "
                     f"installs them.\n{bar}\n\n")


class OptionalBuildExt(build_ext):
    """Cythonize and compile the hot path; on any failure, warn and build pure Python."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:  # the modules compile side by side
            self.parallel = os.cpu_count() or 1

    def run(self):
        # (setuptools' run() clears `inplace` while it builds, and leaves it so on a failure)
        self._in_tree = bool(self.inplace or self.editable_mode)
        if not self.extensions:
            return super().run()
        try:
            from Cython.Build import cythonize
            from Cython.Compiler.Errors import CompileError as CythonCompileError
        except ImportError as e:
            return self._fallback(f"Cython is not installed ({e})")
        try:
            generated = cythonize(
                self.extensions, compiler_directives=DIRECTIVES, quiet=True, force=True,
                # the generated .c files stay in the build directory, never in the source tree
                build_dir=os.path.join(self.build_temp, "cython"))
            # the same Extension objects (setuptools' finalize_options annotated them), now
            # built from the generated C
            c_sources = {e.name: e.sources for e in generated}
            for ext in self.extensions:
                ext.sources = c_sources[ext.name]
            super().run()
        except (CCompilerError, CompileError, ExecError, PlatformError, CythonCompileError) as e:
            self._fallback(f"{type(e).__name__}: {e}")

    def _fallback(self, why: str) -> None:
        warn(why)
        # No half-built or old set: a module compiled before (or before this failure) would be a
        # stale artefact, in the wheel (build/lib) or, for an editable install, in the tree.
        for ext in self.extensions:
            paths = [os.path.join(self.build_lib, self.get_ext_filename(ext.name))]
            if self._in_tree:
                paths.append(os.path.join(HERE, self.get_ext_filename(ext.name)))
            for path in paths:
                if os.path.exists(path):
                    os.remove(path)
        # (a new list: distribution.ext_modules stays as it was, so the wheel keeps the layout
        # and platform tag it was set up with, now holding the .py modules only)
        self.extensions = []

    def get_outputs(self):
        return [] if not self.extensions else super().get_outputs()


class BuildPy(build_py):
    """With HALB_NO_EXTENSIONS=1 an editable install also drops the extensions an earlier
    in-place build left in the tree (they would still be loaded: nothing rebuilds them)."""

    def run(self):
        super().run()
        if no_extensions() and getattr(self, "editable_mode", False):
            for name in compiled_modules():
                base = HERE.joinpath(*name.split("."))
                for suffix in EXTENSION_SUFFIXES:
                    base.with_name(base.name + suffix).unlink(missing_ok=True)


def no_extensions() -> bool:
    return os.environ.get(ENV, "").strip() not in ("", "0")


def extensions() -> list[Extension]:
    if no_extensions():
        sys.stderr.write(f"halb: {ENV} is set: not compiling the L7 hot path\n")
        return []
    return [Extension(name, [name.replace(".", "/") + ".py"], extra_compile_args=["-O2"])
            for name in compiled_modules()]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPy})
