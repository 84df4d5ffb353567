"""Shared fixtures, and the import path of the test layers.

Test modules live in tests/unit (the pure core and small components, seconds in-process) and tests/integration
(training runs, servers, vLLM, torchrun/Megatron workers, exports); the shared helpers (helpers.py,
launch_harness.py, tiny_recipes.py, worker_launch.py, ...) and tests/data stay here. Helpers and some test modules
import each other by plain module name (``from helpers import ...``, ``from test_training import tiny_config``), as
when every file sat in tests/: this folder and both layer folders go on sys.path, so any single file or layer runs
on its own. Test file names stay unique across the layers (pytest's default import mode needs that).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
for _folder in (TESTS / "integration", TESTS / "unit", TESTS):  # TESTS ends up first
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models: intra-op threads only add synchronisation (and stall badly when other jobs share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def served(tmp_path_factory, request):
    """(url, overrides) of a ``nemo-igrpo serve`` of the tiny training model (test_server's), shared by the modules
    that train through a server without breaking it (draft-ahead, asynchronous rollouts); stopped at the session's
    end. Tests must not depend on its weights: every trainer syncs its own before step 1."""
    pytest.importorskip("vllm")
    from test_server import REPO, TINY_TRAIN, start_server

    from nemo_igrpo.config import load_config
    from nemo_igrpo.models import load_model, load_tokenizer

    config = load_config(REPO / "conf" / "quickstart.yaml", TINY_TRAIN)
    torch.manual_seed(123)
    url, _ = start_server(load_model(config.model, load_tokenizer(config.model)), tmp_path_factory.mktemp("served"),
                          request)
    return url, TINY_TRAIN
