import os

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> dict[str, str]:
    """Shapes-world shards written once per session (8 train, 4 val, 16 px): ``{"train": url, "val": url}``.
    Tests read them and write elsewhere."""
    from helpers import write_shapes_shards

    return write_shapes_shards(tmp_path_factory.mktemp("shards"), n_train=8, n_val=4, resolution=16)
