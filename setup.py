"""Builds mmlatent._C, the `native` backend.

The C++ sources in csrc/ are always built (CPU ops). The .cu sources use only the CUDA runtime API, so they are
compiled by nvcc into objects and linked into the same extension even when torch itself has no CUDA: that is how
a CPU-only build machine still produces an extension whose CUDA ops run on a GPU machine.

Environment:
  MMLATENT_CUDA=auto|1|0   auto (default): use nvcc when it is found; 1: require it; 0: CPU ops only.
  MMLATENT_CUDA_ARCHS      semicolon list of targets, default "80;90a" (sm_90a is what H100/H200 run).
"""
import concurrent.futures
import glob
import hashlib
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


def run_nvcc(cmd):
    """Runs one nvcc command; returns its output (ptxas' register and spill report), raises on failure."""
    run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if run.returncode:
        raise RuntimeError(f"nvcc failed ({run.returncode}): {' '.join(cmd)}\n{run.stdout}")
    return run.stdout


def gencode_flags(archs):
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xptxas", "-v"]


def source_stamp(source, flags):
    """What an object compiled from ``source`` depends on: the flags, the source and every header in csrc/."""
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in [source] + sorted(glob.glob(os.path.join(CSRC, "*.h")) + glob.glob(os.path.join(CSRC, "*.cuh"))):
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read())
    return digest.hexdigest()


def compile_cuda_sources(nvcc, build_temp, archs):
    """Compiles csrc/*.cu into objects in ``build_temp``, as many nvcc at a time as MAX_JOBS (torch's build
    variable) or the CPUs allow; an object whose stamp (source_stamp, kept beside it) still matches is reused, so
    a rebuild after a C++ change recompiles no CUDA. Returns the objects."""
    os.makedirs(build_temp, exist_ok=True)
    flags = NVCC_FLAGS + gencode_flags(archs)
    objects, stale = [], []
    for source in sorted(glob.glob(os.path.join(CSRC, "*.cu"))):
        obj = os.path.join(build_temp, os.path.basename(source) + ".o")
        objects.append(obj)
        stamp = source_stamp(source, flags)
        if os.path.exists(obj) and os.path.exists(obj + ".stamp"):
            with open(obj + ".stamp") as f:
                if f.read() == stamp:
                    print(f"{os.path.basename(obj)}: up to date", flush=True)
                    continue
        stale.append(([nvcc, "-c", source, "-o", obj] + flags, obj, stamp))
    jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for (cmd, obj, stamp), log in zip(stale, pool.map(run_nvcc, [cmd for cmd, _, _ in stale])):
            print(" ".join(cmd) + "\n" + log, flush=True)
            with open(obj + ".stamp", "w") as f:
                f.write(stamp)
    return objects


class BuildWithNvcc(BuildExtension):
    """Compiles csrc/*.cu with nvcc first, then links the objects into the C++ extension."""

    def build_extensions(self):
        mode = os.environ.get("MMLATENT_CUDA", "auto")
        nvcc, cuda_home = find_nvcc()
        if mode == "1" and nvcc is None:
            raise RuntimeError("MMLATENT_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        if mode != "0" and nvcc is not None:
            archs = [a for a in os.environ.get("MMLATENT_CUDA_ARCHS", "80;90a").split(";") if a]
            objects = compile_cuda_sources(nvcc, self.build_temp, archs)
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


# pip's build backend runs this file as __main__ too; importing it (compile_cuda_sources alone) builds nothing
if __name__ == "__main__":
    setup(
        ext_modules=[
            CppExtension(
                "mmlatent._C",
                sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
                # -fopenmp: at::parallel_for is OpenMP code in ATen's headers, serial without it; the extension then
                # resolves libgomp.so.1 to the copy torch already loaded, so one OpenMP runtime serves both
                # -fno-trapping-math: no op reads the floating-point exception flags, and without it GCC keeps the
                # compares of branch-free loops (csrc/cpu_math.h's exp) from vectorising; the results are the same.
                # -fno-math-errno likewise: no op reads errno, which otherwise keeps a loop's sqrt scalar
                extra_compile_args={"cxx": ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]},
                extra_link_args=["-fopenmp"],
            )
        ],
        cmdclass={"build_ext": BuildWithNvcc.with_options(use_ninja=True)},
    )
