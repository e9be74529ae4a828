"""BLIP's MED: a ViT image encoder and one text transformer used three ways.

    unimodal encoders  (ITC)  image [CLS] -> vision_proj,  text `[CLS]` -> text_proj   (256-d, normalised)
    image-grounded encoder (ITM) `[ENC]` + bidirectional SA + cross-attention -> itm_head (2 logits)
    image-grounded decoder (LM)  `[DEC]` + causal SA + cross-attention        -> lm_head  (vocab logits)

Every function writes its mode token over position 0 of the ids it is given, as BLIP does, so
callers tokenise once (`[CLS] text [SEP]`) and the network picks the right token for the mode.
The ITC temperature, momentum encoders and feature queues are training state and live in
`losses.MEDObjectives`, not here: this module is exactly what a checkpoint holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MEDConfig
from .text import KVCache, TextTransformer
from .vit import VisionTransformer


class LMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then the vocabulary projection."""

    def __init__(self, width: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(width, width)
        self.transform.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.decoder = nn.Linear(width, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform.LayerNorm(F.gelu(self.transform.dense(x)))
        return self.decoder(x) + self.bias


class MED(nn.Module):
    def __init__(self, config: MEDConfig) -> None:
        super().__init__()
        self.config = config
        t = config.text
        self.visual_encoder = VisionTransformer(config.vision)
        self.text = TextTransformer(t, config.vision.width, config.has_encoder, config.has_decoder)
        if config.has_encoder:
            self.vision_proj = nn.Linear(config.vision.width, config.embed_dim)
            self.text_proj = nn.Linear(t.width, config.embed_dim)
            self.itm_head = nn.Linear(t.width, 2)
        if config.has_decoder:
            self.lm_head = LMHead(t.width, t.vocab_size, t.layer_norm_eps)
        self._init_text_weights()
        self.tie_weights()

    # ------------------------------------------------------------------ set-up
    def _init_text_weights(self) -> None:
        for name, module in self.named_modules():
            if name.startswith("visual_encoder"):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        if self.config.has_decoder and self.config.text.tie_word_embeddings:
            self.lm_head.decoder.weight = self.text.embeddings.word_embeddings.weight

    @property
    def device(self) -> torch.device:
        return self.text.embeddings.word_embeddings.weight.device

    # ------------------------------------------------------------------ image
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, 1 + N, vision width) image tokens, in the text
        side's dtype (fast mode may run the image encoder alone in bf16)."""
        return self.visual_encoder(pixels).to(self.text.embeddings.word_embeddings.weight.dtype)

    def image_feature(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Unimodal image feature for ITC: normalised projection of the image `[CLS]`, (B, embed_dim)."""
        return _normalized(self.vision_proj(image_embeds[:, 0]))

    # ------------------------------------------------------------------ text
    def _with_mode_token(self, input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
        ids = input_ids.clone()
        ids[:, 0] = token_id
        return ids

    def text_feature(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unimodal text feature for ITC from `[CLS]`, (B, embed_dim), normalised."""
        ids = self._with_mode_token(input_ids, self.config.text.cls_token_id)
        hidden = self.text(ids, attention_mask, mode="text", keep=slice(0, 1))
        return _normalized(self.text_proj(hidden[:, 0]))

    def itm_logits(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
        texts_per_image: int = 1,
    ) -> torch.Tensor:
        """Image-grounded encoder with `[ENC]` at position 0 -> (B, 2) logits [no match, match].

        image_embeds (B, 1 + N, Dv), one per text; or one per image, with `image_index` (B,)
        naming each text's image or `texts_per_image` n (texts image-major, n per image), so an
        image scored with several texts is projected to cross-attention keys and values once."""
        ids = self._with_mode_token(input_ids, self.config.text.enc_token_id)
        hidden = self.text(
            ids,
            attention_mask,
            mode="encoder",
            image=image_embeds,
            image_index=image_index,
            texts_per_image=texts_per_image,
            keep=slice(0, 1),
        )
        return self.itm_head(hidden[:, 0])

    def lm_logits(
        self,
        image_embeds: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        keep: slice | None = None,
    ) -> torch.Tensor:
        """Image-grounded decoder -> (B, T, vocab) next-token logits; with `keep`, only those
        positions' (a prompt's last, to start a caption).

        Without a cache, position 0 is overwritten with `[DEC]`; with one, `input_ids` are the
        new tokens only (the cache already holds the prefix and the image's keys and values).
        """
        if cache is None or cache.length == 0:
            input_ids = self._with_mode_token(input_ids, self.config.text.dec_token_id)
        hidden = self.text(
            input_ids, attention_mask, mode="decoder", image=image_embeds, cache=cache, keep=keep
        )
        return self.lm_head(hidden)

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.config.text.depth)

    # ------------------------------------------------------------------ parameter groups
    def encoder_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters the image-grounded encoder uses (everything on the text side but the decoder's SA)."""
        return {n: p for n, p in self.text.named_parameters() if ".causal_attention." not in n}

    def decoder_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters the image-grounded decoder uses (everything on the text side but the encoder's SA)."""
        return {
            n: p for n, p in self.text.named_parameters() if ".attention." not in n or "crossattention" in n
        }


def _normalized(x: torch.Tensor) -> torch.Tensor:
    """x / |x| along the last dimension, computed in float32 and returned in x's dtype: in fp16,
    F.normalize's epsilon (1e-12) underflows to 0, so a tiny vector would become NaN."""
    return F.normalize(x.float(), dim=-1).to(x.dtype)
