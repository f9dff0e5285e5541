"""Compiles a CUDA source with the NVRTC library given (no GPU needed), as the fused engine
does at run time: catches what nvcc accepts but NVRTC, which has no system headers, rejects.
Usage: nvrtc_check.py LIBNVRTC.so SOURCE.cu [NVRTC options...]"""
import ctypes
import sys

lib = ctypes.CDLL(sys.argv[1])
src = open(sys.argv[2], "rb").read()
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, sys.argv[2].encode(), 0, None, None) == 0
opts = [o.encode() for o in sys.argv[3:]]
rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
if rc != 0:
    sys.exit(f"NVRTC failed on {sys.argv[2]} ({rc}):\n{log.value.decode()}")
print(f"NVRTC compiles {sys.argv[2]}")
