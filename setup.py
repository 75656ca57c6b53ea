"""Build of the native extensions (hybrid._kernels, hybrid._ops, profiler._lanes, analysis._jsonl); everything else is in pyproject.toml.

No -march flags: the kernels pick their SIMD path (AVX-512 VNNI, AVX2, scalar)
at run time, so a wheel built here runs on any x86-64 or other CPU.
"""

import sys

from setuptools import Extension, setup

unix = sys.platform != "win32"
setup(
    ext_modules=[
        Extension(
            "hybrid._kernels",
            sources=["hybrid/_kernels.c", "hybrid/_pool.c"],      # the matmuls and the CPU worker pool
            depends=["hybrid/_pool.h", "hybrid/_fp16.h", "hybrid/_vecmath.h"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-pthread"] if unix else [],
            extra_link_args=["-pthread"] if unix else [],
            libraries=["m"] if unix else [],
        ),
        # the forward pass's small float32 ops: norms, RoPE, softmax, router (hybrid/ops.py)
        Extension("hybrid._ops", sources=["hybrid/_ops.c"], depends=["hybrid/_fp16.h", "hybrid/_pool.h", "hybrid/_vecmath.h"],
                  extra_compile_args=["-O3", "-std=c11", "-Wall"] if unix else [],
                  libraries=["m"] if unix else []),
        # the recorder's lanes and the timings writer's line formatter (profiler/recorder.py, sinks.py)
        Extension("profiler._lanes", sources=["profiler/_lanes.c"],
                  extra_compile_args=["-O2", "-std=c11", "-Wall"] if unix else []),
        # the loader's line scanner (analysis/flatjson.py keeps a NumPy route for when it is not built)
        Extension("analysis._jsonl", sources=["analysis/_jsonl.c"],
                  extra_compile_args=["-O2", "-std=c11", "-Wall"] if unix else []),
    ]
)
