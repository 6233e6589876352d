"""DeiT with PRepBN norms and optional SLA attention (SLAB-DeiT).

Paper: "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive
Re-parameterized Batch Normalization" (Guo et al., ICML 2024), on DeiT ("Training data-efficient
image transformers & distillation through attention", Touvron et al., 2021).

Forms, all from one class through ``norm=`` and ``attn=``:
* ``deit_*_prepbn``: softmax attention, class token, PRepBN norms;
* ``deit_*_repbn``: the same with plain RepBN norms (the authors' ``deit_tiny_prepbn.pth`` stores these);
* ``slab_deit_*``: SLA in every block, no class token, average pooling (the authors' SLAB-DeiT);
* any of them with ``norm='ln'`` is the LayerNorm baseline, ``norm='none'`` the norm-free bound.
"""
import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model, register_notrace_function
from timm.models._features import feature_take_indices

from ..layers.attention import get_attn_layer, parse_attn
from ..layers.norm import get_norm_layer
from ..reparam.fold import as_channel_affine, fold_into_consumers
from ._authors import authors_cfg, authors_ln_eps, authors_norm_kind, remap_norm_keys
from ._builder import build_slab_model, check_image_input, drop_path_rates, init_linear_layers, new_classifier

__all__ = ["SlabVisionTransformer", "checkpoint_filter_fn"]


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, norm_layer, attn: str,
                 grid_size: tuple[int, int], sla_kernel_size: int = 5, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = get_attn_layer(attn, "global")(dim, num_heads, grid_size=grid_size, qkv_bias=qkv_bias,
                                                   kernel_size=sla_kernel_size, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), hw))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x

    def fuse(self) -> "Block":
        # norm1 feeds only qkv, norm2 only fc1: both fold exactly into their consumer.
        self.norm1 = fold_into_consumers(self.norm1, [self.attn.qkv])
        self.norm2 = fold_into_consumers(self.norm2, [self.mlp.fc1])
        return self


class SlabVisionTransformer(nn.Module):
    """Vision transformer with a choice of norm (``ln``/``bn``/``repbn``/``prepbn``/``none``) and attention.

    Args:
        img_size: the training resolution (positional embeddings are made for it and resized for others).
        patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: as in timm.
        norm: norm of every block and of the final norm. attn: ``'softmax'`` or ``'sla'``.
        class_token: prepend a class token (DeiT); False for SLAB-DeiT. Without a class token the tokens are
            exactly the patch grid, and ``forward_features`` gives them as a ``[B, H, W, C]`` map
            (``output_fmt`` ``'NHWC'``, as timm's Swin); with one, the ``[B, 1 + H * W, C]`` tokens (``'NLC'``).
        global_pool: ``'token'`` (class token) or ``'avg'`` (mean of the patch tokens).
        ln_eps: LayerNorm eps (1e-6 in DeiT).
        sla_kernel_size: DWC kernel of SLA.
        authors_unused_class_token: keep the authors' unused ``cls_token`` of SLAB-DeiT as a buffer, so their
            checkpoints load strictly (it is not a parameter: nothing reads or trains it).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, norm: str = "prepbn", attn: str = "softmax",
                 class_token: bool = True, global_pool: str = "token", ln_eps: float = 1e-6,
                 sla_kernel_size: int = 5, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, authors_unused_class_token: bool = False):
        super().__init__()
        attn = parse_attn(attn, 1)[0]
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '' (no pooling), got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if attn == "sla" and class_token:
            raise ValueError("SLA attends over a token grid and its DWC cannot place a class token: build SLA models "
                             "with class_token=False, global_pool='avg' (as the authors' SLAB-DeiT)")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.img_size = img_size
        self.norm_kind, self.attn_kind = norm, attn
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_prefix_tokens = 1 if class_token else 0
        self.output_fmt = "NLC" if class_token else "NHWC"
        norm_layer = get_norm_layer(norm, ln_eps=ln_eps)

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        if class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.register_buffer("cls_token", torch.zeros(1, 1, embed_dim) if authors_unused_class_token else None)
        num_pos = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_layer, attn, self.grid_size, sla_kernel_size,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i]) for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if isinstance(self.cls_token, nn.Parameter):
            nn.init.normal_(self.cls_token, std=1e-6)
        init_linear_layers(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters()
                if n in ("pos_embed", "cls_token") or n.endswith(("positional_encoding", ".alpha"))}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            if global_pool == "token" and not self.num_prefix_tokens:
                raise ValueError("global_pool='token' needs a class token")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = new_classifier(self, self.embed_dim, num_classes)

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos = position_embedding_for_grid(self.pos_embed, grid, self.grid_size, self.num_prefix_tokens)
        # The None test first: TorchScript then compiles no class token for models without one.
        if self.cls_token is not None and self.num_prefix_tokens > 0:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images -> tokens with position embedding (and class token), and their grid."""
        if not torch.jit.is_scripting():
            check_image_input(x, self.in_chans, multiple_of=self.patch_size, model=type(self).__name__)
        x = self.patch_embed.proj(x)
        grid = (x.shape[2], x.shape[3])
        return self._pos_embed(x.flatten(2).transpose(1, 2), grid), grid

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Outputs of the blocks at ``indices`` (last n if int, all if None), as in timm's ViT.

        ``norm`` applies the final norm to every intermediate; ``output_fmt`` ``'NCHW'`` gives the patch
        tokens as maps (class token dropped), ``'NLC'`` the tokens. Returns the list, or
        ``(forward_features(x), list)`` unless ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._embed(x)
        last = max_index if stop_early else len(self.blocks) - 1
        intermediates = []
        for i, blk in enumerate(self.blocks):
            if i > last:
                break
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, grid, use_reentrant=False)
            else:
                x = blk(x, grid)
            if i in take:
                y = self.norm(x) if norm else x
                if output_fmt == "NCHW":
                    y = y[:, self.num_prefix_tokens:].reshape(y.shape[0], grid[0], grid[1], -1)
                    y = y.permute(0, 3, 1, 2).contiguous()
                intermediates.append(y)
        if intermediates_only:
            return intermediates
        return self._features_out(self.norm(x), grid), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the norm / head); returns the absolute indices."""
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self._embed(x)
        # TorchScript cannot hand a block to a helper: the checkpointing choice is written out here.
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, grid, use_reentrant=False)
            else:
                x = blk(x, grid)
        return self._features_out(self.norm(x), grid)

    def _features_out(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Final tokens in :attr:`output_fmt`: the ``[B, H, W, C]`` map of a model without prefix tokens."""
        if self.output_fmt == "NHWC":
            return x.reshape(x.shape[0], grid[0], grid[1], x.shape[-1])
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            # The mean of the patch tokens; an NHWC map is flattened back to them (a view: the same sum).
            x = x.flatten(1, 2).mean(dim=1) if self.output_fmt == "NHWC" else x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def fuse(self) -> "SlabVisionTransformer":
        # The final norm could fold into the head (pooling is linear), but forward_features and the
        # intermediates would then change meaning with fusion: it stays a per-channel affine (one
        # multiply-add on the final tokens).
        self.norm = as_channel_affine(self.norm)
        return self


@register_notrace_function  # compares the traced grid with the built one
def position_embedding_for_grid(pos_embed: torch.Tensor, grid: tuple[int, int], built_grid: tuple[int, int],
                        num_prefix_tokens: int) -> torch.Tensor:
    """``pos_embed`` made for ``built_grid``, resampled for ``grid`` when they differ."""
    if grid[0] == built_grid[0] and grid[1] == built_grid[1]:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, list(grid), list(built_grid), num_prefix_tokens=num_prefix_tokens)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: SlabVisionTransformer) -> dict[str, torch.Tensor]:
    """Convert an authors' DeiT / SLAB-DeiT (or timm DeiT) state_dict to this model's keys."""
    out = remap_norm_keys(state_dict, model)
    if "patch_embed.proj.weight" in out and out["patch_embed.proj.weight"].shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
        raise ValueError(f"checkpoint patch size {tuple(out['patch_embed.proj.weight'].shape[-2:])} does not match the "
                         f"model's {model.patch_size}")
    if "pos_embed" in out and out["pos_embed"].shape != model.pos_embed.shape:
        # A checkpoint trained at another resolution: resample its absolute position embedding.
        src = out["pos_embed"]
        n = src.shape[1] - model.num_prefix_tokens
        side = int(round(n ** 0.5))
        if side * side == n:
            out["pos_embed"] = resample_abs_pos_embed(src, list(model.grid_size), [side, side],
                                                      num_prefix_tokens=model.num_prefix_tokens)
    return out


def _cfg(file: str | None = None, **kwargs) -> dict:
    return authors_cfg(file, **{"first_conv": "patch_embed.proj", "crop_pct": 0.875, "pool_size": None, **kwargs})


default_cfgs = generate_default_cfgs({
    # pool_size: the grid of the [B, H, W, C] features of the models without a class token.
    "slab_deit_tiny_patch16_224.authors_in1k": _cfg("slab_deit_tiny.pth", pool_size=(14, 14)),
    "slab_deit_small_patch16_224.authors_in1k": _cfg("slab_deit_small.pth", pool_size=(14, 14)),
    "deit_tiny_prepbn_patch16_224.authors_in1k": _cfg(None),
    "deit_small_prepbn_patch16_224.authors_in1k": _cfg("deit_small_prepbn.pth"),
    "deit_tiny_repbn_patch16_224.authors_in1k": _cfg("deit_tiny_prepbn.pth"),
    "deit_small_repbn_patch16_224": _cfg(None),
    "slab_deit_nano_patch4_28.fashion_mnist": _cfg(None, num_classes=10, input_size=(1, 28, 28), pool_size=(7, 7),
                                                    crop_pct=1.0,
                                                    mean=(0.2860,), std=(0.3530,)),
})

# ImageNet top-1 reported in the paper for each registered model (README model table).
PAPER_TOP1 = {"slab_deit_tiny_patch16_224": 74.3, "slab_deit_small_patch16_224": 80.0,
              "deit_tiny_prepbn_patch16_224": 73.6, "deit_tiny_repbn_patch16_224": 73.6,
              "deit_small_prepbn_patch16_224": 80.2}

# Released file -> registered model that loads it.
AUTHORS_CHECKPOINTS = {
    "deit_tiny_prepbn.pth": "deit_tiny_repbn_patch16_224",
    "deit_small_prepbn.pth": "deit_small_prepbn_patch16_224",
    "slab_deit_tiny.pth": "slab_deit_tiny_patch16_224",
    "slab_deit_small.pth": "slab_deit_small_patch16_224",
}


def _create(variant: str, pretrained: bool = False, **kwargs) -> SlabVisionTransformer:
    if kwargs.get("features_only"):
        # As timm's ViT: the last three blocks (every block has the same stride).
        kwargs.setdefault("feature_cfg", dict(feature_cls="getter", out_indices=3))
    return build_slab_model(SlabVisionTransformer, variant, pretrained, checkpoint_filter_fn, **kwargs)


_SLAB = dict(attn="sla", norm="prepbn", class_token=False, global_pool="avg", authors_unused_class_token=True)


@register_model
def slab_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> SlabVisionTransformer:
    """SLAB-DeiT-T: SLA + PRepBN, no class token (74.3 top-1 in the paper)."""
    return _create("slab_deit_tiny_patch16_224", pretrained, **dict(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, **_SLAB), **kwargs))


@register_model
def slab_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> SlabVisionTransformer:
    """SLAB-DeiT-S: SLA + PRepBN, no class token (80.0 top-1)."""
    return _create("slab_deit_small_patch16_224", pretrained, **dict(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, **_SLAB), **kwargs))


@register_model
def deit_tiny_prepbn_patch16_224(pretrained: bool = False, **kwargs) -> SlabVisionTransformer:
    """DeiT-T with PRepBN, softmax attention, class token (73.6 top-1)."""
    return _create("deit_tiny_prepbn_patch16_224", pretrained, **dict(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, norm="prepbn"), **kwargs))


@register_model
def deit_small_prepbn_patch16_224(pretrained: bool = False, **kwargs) -> SlabVisionTransformer:
    """DeiT-S with PRepBN, softmax attention, class token (80.2 top-1)."""
    return _create("deit_small_prepbn_patch16_224", pretrained, **dict(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, norm="prepbn"), **kwargs))


@register_model
def deit_tiny_repbn_patch16_224(pretrained: bool = False, **kwargs) -> SlabVisionTransformer:
    """DeiT-T with plain RepBN norms: the layout of the authors' released ``deit_tiny_prepbn.pth``."""
    return _create("deit_tiny_repbn_patch16_224", pretrained, **dict(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, norm="repbn"), **kwargs))


@register_model
def deit_small_repbn_patch16_224(pretrained: bool = False, **kwargs) -> SlabVisionTransformer:
    """DeiT-S with plain RepBN norms."""
    return _create("deit_small_repbn_patch16_224", pretrained, **dict(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, norm="repbn"), **kwargs))


@register_model
def slab_deit_nano_patch4_28(pretrained: bool = False, **kwargs) -> SlabVisionTransformer:
    """A small SLAB-DeiT for 28x28 one-channel images (Fashion-MNIST): 7x7 tokens, 64 channels, 4 blocks."""
    args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=2,
                mlp_ratio=2.0, attn="sla", norm="prepbn", class_token=False, global_pool="avg", sla_kernel_size=3)
    return _create("slab_deit_nano_patch4_28", pretrained, **dict(args, **kwargs))


def from_authors_record(record: dict) -> SlabVisionTransformer:
    """Our model equivalent to the authors' ``deit.VisionTransformer`` / ``slab_deit.VisionTransformer`` record."""
    c = record["constructor"]
    sla = record["authors_class"].startswith("slab_deit")
    args = dict(img_size=record.get("input_shape", [1, 3, 224, 224])[-1], patch_size=c.get("patch_size", 16),
                embed_dim=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"], mlp_ratio=c.get("mlp_ratio", 4),
                qkv_bias=c.get("qkv_bias", True), num_classes=c.get("num_classes", 1000),
                in_chans=c.get("in_chans", 3), norm=authors_norm_kind(c), ln_eps=authors_ln_eps(c, 1e-6))
    if sla:
        args.update(_SLAB)
        args["norm"] = authors_norm_kind(c)
    return SlabVisionTransformer(**args)


AUTHORS_CLASSES = {"deit.VisionTransformer": from_authors_record, "slab_deit.VisionTransformer": from_authors_record}
