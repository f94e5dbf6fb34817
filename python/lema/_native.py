"""Where the package looks for its native libraries (torch ops, device allocator, preload hook)."""

import builtins
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def library_places(path, env, library, record):
    """(where, path) pairs to try, in order: `path` alone when given; else $`env`, the library
    beside the package (an installed wheel), and the build tree last configured from this source
    tree, whose path CMake writes at configure time into the file `record` beside the package."""
    if path is not None:
        return [("the path given", os.fspath(path))]
    places = []
    if os.environ.get(env):
        places.append(("$" + env, os.environ[env]))
    places.append(("beside the package", os.path.join(_HERE, library)))
    record = os.path.join(_HERE, record)
    if os.path.exists(record):
        with builtins.open(record) as f:
            places.append(("the build configured last (" + record + ")", f.read().strip()))
    return places
