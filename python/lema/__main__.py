"""`python -m lema ...`: the `lema` command installed with the package (or, in a source tree,
the build's), with the same arguments."""
import os
import shutil
import sys
import sysconfig


def _command():
    scripts = sysconfig.get_path("scripts")
    for candidate in (os.path.join(scripts, "lema"), shutil.which("lema")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    here = os.path.dirname(os.path.abspath(__file__))
    record = os.path.join(here, "_build_tree")  # the build tree's ops library, tools beside
    if os.path.exists(record):
        with open(record) as f:
            build = os.path.dirname(os.path.dirname(f.read().strip()))
        candidate = os.path.join(build, "tools", "lema")
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def main():
    command = _command()
    if command is None:
        sys.exit("lema: the lema command was not found in this environment's scripts "
                 f"({sysconfig.get_path('scripts')}) nor on PATH; pip install lema")
    os.execv(command, [command, *sys.argv[1:]])


if __name__ == "__main__":
    main()
