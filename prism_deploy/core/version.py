"""The package's version, in a module of its own.

Modules that record which prism-deploy wrote a file import it from here, not from the package
root: the root is the user's table of lazily loaded names (``Pipeline``, ``load_engines``...),
and importing from it would make every such module depend on all of them
(tests/test_import_graph.py keeps the module graph free of circles).
"""

from __future__ import annotations

__version__ = "0.1.0"
