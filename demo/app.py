"""Launch the mm_llama Gradio demo:
``python demo/app.py --checkpoint DIR [--host H] [--port P] [--share] [--plugin FILE ...]``.

A thin launcher: the app itself is :mod:`mm_llama.demo` (``answer``, ``build_app``, ``serve``, ``main``),
the same code that ``mm-llama demo`` runs.
"""

from __future__ import annotations

from mm_llama.demo import answer, build_app, main, serve

__all__ = ["answer", "build_app", "main", "serve"]

if __name__ == "__main__":
    main()
