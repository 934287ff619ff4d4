"""Fixtures shared by more than one test area (pytest finds them here; a test names them as arguments or in
`pytest.mark.usefixtures`, never imports them). Plain helpers are in tiny.py; an area's own fixtures are in
its conftest.py."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from tiny import words_tokenizer

# The token cache (build_llm.data.cache) of every test and of the processes tests start: a private
# folder of this session, never the user's own cache.
if "BUILD_LLM_CACHE" not in os.environ:
    os.environ["BUILD_LLM_CACHE"] = tempfile.mkdtemp(prefix="build-llm-cache-")
    atexit.register(shutil.rmtree, os.environ["BUILD_LLM_CACHE"], True)


@pytest.fixture
def one_thread():
    """One CPU thread for a test of tiny models: two threads cost more in waiting on each other than
    they save, and many times more on a machine whose cores are busy. Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    """The fine-tuning data sets' BPE tokenizer (tiny.words_tokenizer)."""
    return words_tokenizer()
