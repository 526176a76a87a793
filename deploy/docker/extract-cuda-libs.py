"""Copies the CUDA 13 shared objects autoglm dlopens (cuBLAS, cuBLASLt, NVRTC and the builtins
NVRTC loads) and the wheels' licences out of NVIDIA's wheels: extract-cuda-libs.py WHEEL_DIR OUT.
Fails unless all four libraries were found. Used by deploy/docker/Dockerfile (stage cuda-libs)."""

import pathlib
import re
import sys
import zipfile

KEEP = re.compile(
    r"nvidia/cu13/lib/(libcublas\.so\.13|libcublasLt\.so\.13|libnvrtc\.so\.13"
    r"|libnvrtc-builtins\.so\.13\.\d+)$"
)
wheels, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
(out / "lib").mkdir(parents=True, exist_ok=True)
(out / "licenses").mkdir(parents=True, exist_ok=True)
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            m = KEEP.search(name)
            if m:
                lib = out / "lib" / m.group(1)
                lib.write_bytes(z.read(name))
                lib.chmod(0o755)
            elif name.endswith(".dist-info/licenses/License.txt"):
                dist = name.split(".dist-info")[0]
                (out / "licenses" / f"{dist}.License.txt").write_bytes(z.read(name))
found = sorted(p.name for p in (out / "lib").iterdir())
print("CUDA libraries:", *found)
if len(found) != 4:
    sys.exit(f"expected cuBLAS, cuBLASLt, NVRTC and its builtins, found {found}")
