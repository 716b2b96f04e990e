import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny random Llama with the SmolLM2 tokenizer (see realign.testing.tiny_model)."""
    from realign.testing import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)
