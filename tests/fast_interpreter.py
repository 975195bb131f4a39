"""Make Triton's interpreter patch ``triton.language`` once per launch, not once per call.

The interpreter re-patches the language modules on every call of a ``@triton.jit``
helper inside a kernel (``tl.sum``, ``tl.cumsum`` and the project's own helpers), which
costs ~5 ms per call and dominates kernels built from small helpers. Re-patching is a
no-op (patched members are no longer builtins), so within one launch each distinct set
of language modules is patched once; the launch's own patch is restored at its end as
before. ``install()`` is idempotent and does nothing if the interpreter's internals are
not the expected ones (then everything runs as before, only slower).
"""

from __future__ import annotations

import inspect


def install() -> None:
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    if getattr(interpreter, "_specdec_fast", False):
        return
    patch_lang = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    scope_cls = getattr(interpreter, "_LangPatchScope", None)
    if patch_lang is None or executor is None or scope_cls is None:
        return
    patched: set = set()

    def patch_once(fn):
        langs = tuple(id(v) for v in fn.__globals__.values()
                      if inspect.ismodule(v) and v in (tl, tl.core))
        if langs in patched:
            return scope_cls()  # already patched in this launch: nothing to restore
        patched.add(langs)
        return patch_lang(fn)

    launch = executor.__call__

    def call(self, *args, **kwargs):
        patched.clear()
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.clear()

    interpreter._patch_lang = patch_once
    executor.__call__ = call
    interpreter._specdec_fast = True
