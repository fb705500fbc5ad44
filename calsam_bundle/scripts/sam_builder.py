"""Build Segment Anything models of the registry sizes and a small CPU size from ``segment_anything`` classes.

The registry sizes (``vit_b``, ``vit_l``, ``vit_h``) match the official checkpoints at 1024 px. ``small`` is a
two-block ViT at 256 px for CPU runs and tests; no pretrained weights exist for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

PROMPT_EMBED_DIM = 256
PATCH_SIZE = 16
# SAM's ImageNet pixel statistics on the [0, 255] scale; checkpoints were trained with them.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamSpec:
    """Architecture of one SAM variant.

    Attributes:
        embed_dim: ViT token width.
        depth: number of ViT blocks.
        num_heads: attention heads per block.
        global_attn_indexes: blocks that attend globally instead of within windows.
        image_size: side of the square encoder input in pixels; a multiple of 16.
        window_size: side of the attention window in tokens for the windowed blocks.
    """

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    window_size: int = 14
    mlp_ratio: float = 4.0

    @property
    def embedding_size(self) -> int:
        """Side of the square image embedding in tokens."""
        return self.image_size // PATCH_SIZE


SAM_VARIANTS: dict[str, SamSpec] = {
    "vit_b": SamSpec(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": SamSpec(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamSpec(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "small": SamSpec(embed_dim=192, depth=2, num_heads=3, global_attn_indexes=(1,), image_size=256, window_size=8),
}


def resolve_spec(variant: str, image_size: int | None = None) -> SamSpec:
    """Return the architecture of ``variant``, optionally at another encoder input size.

    Raises:
        ValueError: unknown variant, or an image size that is not a positive multiple of 16.
    """
    if variant not in SAM_VARIANTS:
        raise ValueError(f"Unknown SAM variant {variant!r}; choose one of {sorted(SAM_VARIANTS)}.")
    spec = SAM_VARIANTS[variant]
    if image_size is None:
        return spec
    if int(image_size) <= 0 or int(image_size) % PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE}, got {image_size}.")
    return replace(spec, image_size=int(image_size))


def build_sam(variant: str = "vit_b", image_size: int | None = None, init_seed: int = 0) -> Sam:
    """Build a randomly initialised SAM of the given variant.

    The random initialisation is seeded by ``init_seed`` and restores the global RNG state afterwards, so a
    network built twice with one seed has bit-identical weights; that is what lets a checkpoint of a
    random-encoder run (quickstart, tests) be rebuilt and verified by the encoder's weight hash.

    Args:
        variant: one of ``SAM_VARIANTS``.
        image_size: encoder input side in pixels; ``None`` keeps the variant's default.
        init_seed: seed for the random initial weights.

    Returns:
        A ``segment_anything.modeling.Sam`` in eval mode.
    """
    spec = resolve_spec(variant, image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=spec.image_size,
                patch_size=PATCH_SIZE,
                embed_dim=spec.embed_dim,
                depth=spec.depth,
                num_heads=spec.num_heads,
                mlp_ratio=spec.mlp_ratio,
                out_chans=PROMPT_EMBED_DIM,
                qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=spec.window_size,
                global_attn_indexes=spec.global_attn_indexes,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=PROMPT_EMBED_DIM,
                image_embedding_size=(spec.embedding_size, spec.embedding_size),
                input_image_size=(spec.image_size, spec.image_size),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                transformer_dim=PROMPT_EMBED_DIM,
                transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
                num_multimask_outputs=3,
                iou_head_depth=3,
                iou_head_hidden_dim=256,
            ),
            pixel_mean=list(PIXEL_MEAN),
            pixel_std=list(PIXEL_STD),
        )
    return sam.eval()


def spec_as_dict(variant: str, image_size: int | None = None) -> dict:
    """Return the resolved architecture as plain data, for checkpoints and tracking."""
    return {"variant": variant, **asdict(resolve_spec(variant, image_size))}
