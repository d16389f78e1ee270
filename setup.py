"""Builds mmlatent._C, the `native` backend.

The C++ sources in csrc/ are always built (CPU ops). The .cu sources use only the CUDA runtime API, so they are
compiled by nvcc into objects and linked into the same extension even when torch itself has no CUDA: that is how
a CPU-only build machine still produces an extension whose CUDA ops run on a GPU machine.

Environment:
  MMLATENT_CUDA=auto|1|0   auto (default): use nvcc when it is found; 1: require it; 0: CPU ops only.
  MMLATENT_CUDA_ARCHS      semicolon list of targets, default "80;90a" (sm_90a is what H100/H200 run).
"""
import glob
import os
import shutil
import subprocess

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for candidate in (os.path.join(cuda_home, "bin", "nvcc"), shutil.which("nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate, os.path.dirname(os.path.dirname(os.path.realpath(candidate)))
    return None, None


def gencode_flags(archs):
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


class BuildWithNvcc(BuildExtension):
    """Compiles csrc/*.cu with nvcc first, then links the objects into the C++ extension."""

    def build_extensions(self):
        mode = os.environ.get("MMLATENT_CUDA", "auto")
        nvcc, cuda_home = find_nvcc()
        if mode == "1" and nvcc is None:
            raise RuntimeError("MMLATENT_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        if mode != "0" and nvcc is not None:
            archs = [a for a in os.environ.get("MMLATENT_CUDA_ARCHS", "80;90a").split(";") if a]
            os.makedirs(self.build_temp, exist_ok=True)
            objects = []
            for source in sorted(glob.glob(os.path.join(CSRC, "*.cu"))):
                obj = os.path.join(self.build_temp, os.path.basename(source) + ".o")
                cmd = [nvcc, "-c", source, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xptxas", "-v"]
                cmd += gencode_flags(archs)
                print(" ".join(cmd), flush=True)
                subprocess.check_call(cmd)
                objects.append(obj)
            lib_dir = os.path.join(cuda_home, "lib64")
            for ext in self.extensions:
                ext.extra_objects += objects
                ext.include_dirs.append(os.path.join(cuda_home, "include"))
                ext.library_dirs.append(lib_dir)
                # Static cudart: the extension then needs no libcudart.so at import time on a CPU machine.
                ext.libraries += ["cudart_static", "rt", "pthread", "dl"]
                ext.define_macros += [("MMLATENT_WITH_CUDA", None),
                                      ("MMLATENT_CUDA_ARCHS", '"' + ";".join(archs) + '"')]
        super().build_extensions()


setup(
    ext_modules=[
        CppExtension(
            "mmlatent._C",
            sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
            # -fopenmp: at::parallel_for is OpenMP code in ATen's headers, serial without it; the extension then
            # resolves libgomp.so.1 to the copy torch already loaded, so one OpenMP runtime serves both
            # -fno-trapping-math: no op reads the floating-point exception flags, and without it GCC keeps the
            # compares of branch-free loops (csrc/cpu_math.h's exp) from vectorising; the results are the same
            extra_compile_args={"cxx": ["-O3", "-fopenmp", "-fno-trapping-math"]},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildWithNvcc.with_options(use_ninja=True)},
)
