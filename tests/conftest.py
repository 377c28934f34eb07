import pytest

from potluck.localswarm import PeerProcess


@pytest.fixture
def spawn(tmp_path):
    """spawn(*args) starts a `potluck serve` process with its own data dir; all are killed at the end."""
    procs: list[PeerProcess] = []

    def _spawn(*args: str, env: dict | None = None, data_dir=None) -> PeerProcess:
        proc = PeerProcess(data_dir or tmp_path / f"peer{len(procs)}", *args, env=env)
        procs.append(proc)
        return proc.start()

    yield _spawn
    for proc in procs:
        proc.close()


@pytest.fixture(scope="session")
def smollm2_data(tmp_path_factory):
    """(data dir, folder): the default model converted once for the whole test session."""
    from pipeline.convert import ensure_default_model

    data = tmp_path_factory.mktemp("smollm2")
    return data, ensure_default_model(data, progress=False)


# The model fixtures import torch/transformers only when used, so collecting the other tests stays light.

@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    """The tiny random-weight Llama (testkit.models), saved once for the whole session; tests only read it."""
    from testkit.models import make_tiny

    path = tmp_path_factory.mktemp("llama")
    make_tiny("llama", path)
    return path


@pytest.fixture(scope="module")
def llama(llama_folder):
    """(folder, model id, local model) of the tiny Llama. A module that also needs the config overrides
    this fixture with one that extends it (test_billing.py, test_spotcheck.py)."""
    from pipeline.identity import model_id
    from pipeline.loading import load_local_model

    return llama_folder, model_id(llama_folder), load_local_model(llama_folder, device="cpu")
