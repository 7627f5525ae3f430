import os
import sys

# Triton's interpreter runs @triton.jit kernels on CPU tensors; it must be switched on before the module that
# defines the kernels is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from tiny import base_llm, tiny_dass  # noqa: E402


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    """Tiny base LLMs ('mamba', 'llama': folders) and tiny DASS checkpoints ('small', 'medium': files)."""
    root = tmp_path_factory.mktemp("bases")
    out = {llm: base_llm(llm, root / llm) for llm in ("mamba", "llama")}
    out.update({size: tiny_dass(size, root) for size in ("small", "medium")})
    return out
