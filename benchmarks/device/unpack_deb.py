"""Unpacks a .deb's files into a folder, for machines without dpkg-deb.

    python3 unpack_deb.py PACKAGE.deb DEST

A .deb is an ar archive whose data.tar.{xz,gz,zst} member holds the files; xz and gz are read
with the standard library (Debian's packages use xz).
"""
import io
import sys
import tarfile


def main():
    deb, dest = sys.argv[1], sys.argv[2]
    data = open(deb, "rb").read()
    if data[:8] != b"!<arch>\n":
        sys.exit(f"unpack_deb: {deb} is not a .deb (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos:pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48:pos + 58].decode().strip())
        body = data[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                sys.exit(f"unpack_deb: {deb} holds {name}; zstd is not in Python's standard "
                         "library: fetch Debian's (xz) packages")
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                # Debian's packages hold absolute symlinks, which run.sh points into the prefix.
                if hasattr(tarfile, "fully_trusted_filter"):
                    tar.extractall(dest, filter="fully_trusted")
                else:
                    tar.extractall(dest)
            return
        pos += 60 + size + (size & 1)
    sys.exit(f"unpack_deb: {deb} has no data.tar member")


if __name__ == "__main__":
    main()
