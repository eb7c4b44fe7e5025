"""Build of qioc_green's optional compiled hot path (metadata stays in setup.cfg).

``qioc_green._speedups`` is C against CPython's API, no other dependency. Where it cannot be
compiled (no compiler, no Python headers), the package installs as pure Python and this says
so in one line; ``qioc_green.SPEEDUPS`` then reads False.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class optional_build_ext(build_ext):
    """build_ext that falls back to pure Python when the extension does not compile."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # the compiler itself missing shows up here
            self._fallback(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._fallback(exc)

    def _fallback(self, exc: Exception) -> None:
        text = " ".join(str(exc).split())
        why = type(exc).__name__ + (f": {text[:100]}{'...' if len(text) > 100 else ''}" if text else "")
        print(f"qioc_green: the compiled hot path (_speedups) did not build ({why}); installing pure Python",
              file=sys.stderr)


setup(
    ext_modules=[Extension("qioc_green._speedups", ["qioc_green/_speedups.c"])],
    cmdclass={"build_ext": optional_build_ext},
)
