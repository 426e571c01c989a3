"""A tiny, randomly initialised ChatTTS 0.2.5 asset directory for tests (needs ChatTTS).

The real assets are ~1 GB; these have the same file layout and module types with small
dimensions (GPT hidden 64 / 2 layers), so ``Chat.load(source="custom")`` and ``infer`` run
the real code path in seconds on CPU. ChatTTS checks every file against its built-in
sha256 map and builds modules from its built-in config, so ``configure(chat, directory)``
must be applied to each Chat before ``load``: it installs matching fresh config objects
and the hashes of the files written here. The audio is noise; only shapes are meaningful.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

HIDDEN = 64
LAYERS = 2
NUM_AUDIO_TOKENS = 626
NUM_VQ = 4
# Text tokens first (ids below [break_0] count as text when refined text is decoded), then
# ChatTTS's control tokens in the order of its own tokenizer.
CONTROL_TOKENS = (
    [f"[break_{i}]" for i in range(8)] + ["[Ebreak]", "[Sbreak]", "[Pbreak]", "[Stts]",
                                          "[Ptts]", "[spk_emb]", "[empty_spk]", "[uv_break]",
                                          "[lbreak]"]
    + [f"[speed_{i}]" for i in range(10)] + [f"[laugh_{i}]" for i in range(3)]
    + [f"[oral_{i}]" for i in range(10)])
BASIC_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXT_TOKENS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;")


def tiny_config() -> Any:
    """Fresh ChatTTS config dataclasses with tiny dimensions (never the shared defaults)."""
    import numpy as np
    import pybase16384 as b14
    from ChatTTS.config import config as c

    num_text = len(BASIC_TOKENS) + len(TEXT_TOKENS) + len(CONTROL_TOKENS)
    small = {"hidden": 32, "n_layer": 1, "bn_dim": 16}
    spk_stat = np.concatenate([np.full(HIDDEN, 0.5), np.zeros(HIDDEN)]).astype(np.float16)
    return c.Config(
        path=c.Path(),
        decoder=c.Decoder(idim=HIDDEN // 2, odim=HIDDEN // 2, **small),
        dvae=c.DVAE(encoder=c.Decoder(idim=32, odim=64, **small),
                    decoder=c.Decoder(idim=32, odim=32, **small),
                    vq=c.VQ(dim=64, levels=(5, 5, 5, 5), G=2, R=2)),
        gpt=c.GPT(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_attention_heads=2,
                  num_hidden_layers=LAYERS, use_cache=False, max_position_embeddings=512,
                  spk_emb_dim=HIDDEN, spk_KL=False, num_audio_tokens=NUM_AUDIO_TOKENS,
                  num_text_tokens=num_text, num_vq=NUM_VQ),
        embed=c.Embed(hidden_size=HIDDEN, num_audio_tokens=NUM_AUDIO_TOKENS,
                      num_text_tokens=num_text, num_vq=NUM_VQ),
        vocos=c.Vocos(
            feature_extractor=c.FeatureExtractor(init_args=c.FeatureExtractorInitArgs()),
            backbone=c.Backbone(init_args=c.BackboneInitArgs(
                input_channels=100, dim=32, intermediate_dim=64, num_layers=1)),
            head=c.FourierHead(init_args=c.FourierHeadInitArgs(
                dim=32, n_fft=1024, hop_length=256, padding="center"))),
        spk_stat=b14.encode_to_string(spk_stat.tobytes()),
    )


def build_tiny_assets(directory: Path, seed: int = 0) -> Path:
    """Write ``directory/asset/...`` with random weights; returns ``directory``."""
    import torch
    from ChatTTS.model.dvae import DVAE
    from ChatTTS.model.embed import Embed
    from safetensors.torch import save_file
    from transformers import BertTokenizerFast, LlamaConfig, LlamaModel
    from vocos import Vocos
    from vocos.pretrained import instantiate_class

    torch.manual_seed(seed)
    cfg = tiny_config()
    asset = directory / "asset"
    (asset / "gpt").mkdir(parents=True, exist_ok=True)

    def save(module: torch.nn.Module, name: str) -> None:
        state = {k: v.contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(asset / name))

    vocos = Vocos(
        feature_extractor=instantiate_class(args=(), init=asdict(cfg.vocos.feature_extractor)),
        backbone=instantiate_class(args=(), init=asdict(cfg.vocos.backbone)),
        head=instantiate_class(args=(), init=asdict(cfg.vocos.head)))
    save(vocos, "Vocos.safetensors")
    save(DVAE(decoder_config=asdict(cfg.dvae.decoder), encoder_config=asdict(cfg.dvae.encoder),
              vq_config=asdict(cfg.dvae.vq), dim=cfg.dvae.decoder.idim), "DVAE.safetensors")
    save(DVAE(decoder_config=asdict(cfg.decoder), dim=cfg.decoder.idim), "Decoder.safetensors")
    save(Embed(HIDDEN, NUM_AUDIO_TOKENS, cfg.embed.num_text_tokens, NUM_VQ),
         "Embed.safetensors")
    llama = LlamaModel(LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_attention_heads=2,
        num_key_value_heads=2, num_hidden_layers=LAYERS, max_position_embeddings=512,
        vocab_size=8))
    llama.save_pretrained(str(asset / "gpt"), safe_serialization=True)

    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(BASIC_TOKENS + TEXT_TOKENS + CONTROL_TOKENS) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    tokenizer.add_special_tokens({"additional_special_tokens": CONTROL_TOKENS})
    tokenizer.save_pretrained(str(asset / "tokenizer"))
    vocab.unlink()
    return directory


def sha256_map(directory: Path) -> dict[str, str]:
    """ChatTTS's ``sha256_asset_<dir>_<file_ext>`` keys for every file written."""
    result = {}
    for path in sorted((directory / "asset").rglob("*")):
        if path.is_file():
            rel = path.relative_to(directory)
            key = "sha256_" + "_".join(rel.parts[:-1]) + "_" + rel.name.replace(".", "_")
            result[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def configure(chat: Any, directory: Path) -> None:
    """Point a fresh ``ChatTTS.Chat`` at the tiny assets (call before ``chat.load``)."""
    chat.config = tiny_config()
    chat.sha256_map = sha256_map(directory)


def describe(directory: Path) -> str:
    """The written files and sizes, for failure messages."""
    return json.dumps({str(p.relative_to(directory)): p.stat().st_size
                       for p in sorted(directory.rglob("*")) if p.is_file()})
