import os
import sys

# Triton's interpreter runs @triton.jit kernels on CPU tensors; it must be switched on before the module that
# defines the kernels is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
