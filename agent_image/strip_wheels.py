"""Strip the debug information from the compiled extensions inside wheels, in place (build stage only).

    python strip_wheels.py DIR        (needs binutils' strip)

uvloop's wheel ships 12 MB of DWARF in a 13.6 MB extension, PyYAML's 2 MB: the agent's
image carries none of it. Each changed wheel is rewritten with its RECORD updated, so pip
installs it as it would the original.
"""

import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def strip_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        infos = z.infolist()
        files = {i.filename: z.read(i) for i in infos}
    libraries = [name for name in files if name.endswith(".so") or ".so." in name]
    if not libraries:
        return
    with tempfile.TemporaryDirectory() as work:
        for name in libraries:
            path = Path(work) / "lib.so"
            path.write_bytes(files[name])
            subprocess.run(["strip", "--strip-debug", str(path)], check=True)
            files[name] = path.read_bytes()
    record = next(name for name in files if name.endswith(".dist-info/RECORD"))
    files[record] = ("\n".join(record_line(n, d) for n, d in files.items() if n != record)
                     + f"\n{record},,\n").encode()
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for info in infos:
            z.writestr(info, files[info.filename])


if __name__ == "__main__":
    for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
        strip_wheel(wheel)
