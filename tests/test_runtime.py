import random

import numpy as np
import pytest
import torch

from build_llm import get_device, set_seed
from build_llm.runtime import get_dtype


def test_set_seed_makes_python_numpy_and_torch_repeat():
    set_seed(7)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_seed(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    with pytest.raises(ValueError, match="seed=-1"):
        set_seed(-1)


def test_get_device():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert get_device().type == expected
    assert get_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='gpu0' is invalid"):
        get_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            get_device("cuda")


def test_get_dtype():
    assert get_dtype("bf16") is torch.bfloat16 and get_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="dtype='int8' is invalid"):
        get_dtype("int8")
