"""Build of the native extensions (hybrid._kernels, hybrid._ops, profiler._lanes, analysis._jsonl); everything else is in pyproject.toml.

No -march flags: the kernels pick their SIMD path at run time (cpuid), so a wheel
built here runs on any x86-64 or other CPU. Each instruction set's kernels are one
file (hybrid/kernels/), compiled alone with its own target flags (`ISA_FILES`), which
setuptools cannot do for one Extension's sources: `build_ext` below compiles them
first and links their objects in. The x86 files are built only for x86 with GCC or
Clang, and define HYPROF_<ISA> so that the quant traits table lists their kernels.
"""

import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

unix = sys.platform != "win32"
x86 = unix and platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
C_FLAGS = ["-O3", "-std=c11", "-Wall"] if unix else []
# kernel file -> (its target flags, the macro that lists its kernels in hybrid/quant_traits.c)
ISA_FILES = {
    "hybrid/kernels/avx2.c": (["-mavx2", "-mfma", "-mf16c"], "HYPROF_AVX2"),
    "hybrid/kernels/avx512.c": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"],
                                "HYPROF_AVX512"),
} if x86 else {}
KERNEL_HEADERS = ["hybrid/_pool.h", "hybrid/_fp16.h", "hybrid/_vecmath.h", "hybrid/quant_traits.h",
                  "hybrid/kernels/kernels.h"]


class build_ext(_build_ext):
    """build_ext that compiles an extension's `isa_sources` one by one, each with its own flags."""

    def build_extension(self, ext):
        objects = []
        for source, flags in getattr(ext, "isa_sources", {}).items():
            objects += self.compiler.compile([source], output_dir=self.build_temp, macros=ext.define_macros,
                                             include_dirs=ext.include_dirs, depends=ext.depends,
                                             extra_postargs=ext.extra_compile_args + flags)
        linked = ext.extra_objects
        ext.extra_objects = linked + objects
        try:
            super().build_extension(ext)
        finally:
            ext.extra_objects = linked


kernels = Extension(
    "hybrid._kernels",
    # the driver, the quant traits table, the scalar kernels, and the CPU worker pool
    sources=["hybrid/_kernels.c", "hybrid/quant_traits.c", "hybrid/kernels/scalar.c", "hybrid/_pool.c"],
    depends=KERNEL_HEADERS + list(ISA_FILES),
    define_macros=[(macro, "1") for _, macro in ISA_FILES.values()],
    extra_compile_args=C_FLAGS + ["-pthread"] if unix else [],
    extra_link_args=["-pthread"] if unix else [],
    libraries=["m"] if unix else [],
)
kernels.isa_sources = {source: flags for source, (flags, _) in ISA_FILES.items()}

setup(
    cmdclass={"build_ext": build_ext},
    ext_modules=[
        kernels,
        # the forward pass's small float32 ops: norms, RoPE, softmax, router (hybrid/ops.py)
        Extension("hybrid._ops", sources=["hybrid/_ops.c"], depends=KERNEL_HEADERS,
                  extra_compile_args=C_FLAGS, libraries=["m"] if unix else []),
        # the recorder's lanes and the timings writer's line formatter (profiler/recorder.py, sinks.py)
        Extension("profiler._lanes", sources=["profiler/_lanes.c"],
                  extra_compile_args=["-O2", "-std=c11", "-Wall"] if unix else []),
        # the loader's line scanner (analysis/flatjson.py keeps a NumPy route for when it is not built)
        Extension("analysis._jsonl", sources=["analysis/_jsonl.c"],
                  extra_compile_args=["-O2", "-std=c11", "-Wall"] if unix else []),
    ]
)
