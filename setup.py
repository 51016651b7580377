"""Build the optional native kernels (plain C, no dependency but a C compiler).

Everything else is declared in pyproject.toml. Without a compiler the install
still succeeds (``optional=True``) and moerge falls back to its torch code path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "moerge.native._kernels",
            sources=["src/moerge/native/kernels.c"],
            # no fused multiply-add: results must not depend on how the compiler vectorises;
            # no FP traps: lets masks and divisions be if-converted and vectorised (values unchanged)
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
                                "-fvisibility=hidden"],
            optional=True,
        )
    ]
)
