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
