"""discover_blocks on tiny instances of ComfyUI's own diffusion model classes.

For each family the blocks must be exactly the family's repeated blocks (names and count), in the
order a real forward pass runs them, and each block's parameters must be the model's own, under the
block's qualified name, with no parameter in two blocks.
"""
import contextlib
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

pytestmark = pytest.mark.comfy

SEED = 20261127


def x4(c=4, h=8, w=8):
    return torch.randn(1, c, h, w)


def x5(c=4, t=2, h=8, w=8):
    return torch.randn(1, c, t, h, w)


def ctx(tokens=5, dim=16):
    return torch.randn(1, tokens, dim)


def t():
    return torch.tensor([0.5])


def names(prefix, n):
    return [f"{prefix}.{i}" for i in range(n)]


@dataclass(frozen=True)
class Family:
    id: str
    module: str  # under comfy.ldm
    cls: str
    kwargs: dict
    expected: list[str]
    run: Callable  # model -> output of one forward pass
    absent: tuple[str, ...] = field(default=())  # block lists that must stay resident (never streamed)
    upstream_kwargs: dict = field(default_factory=dict)  # required from UPSTREAM on; older classes refuse them

    def kwargs_for(self, comfyui_version: tuple[int, ...]) -> dict:
        return {**self.kwargs, **self.upstream_kwargs} if comfyui_version >= UPSTREAM else self.kwargs


# The parameter classes of Flux, Chroma and HunyuanVideo gained required fields after 0.3.75; 0.33.0
# has them. Values as upstream's comfy/model_detection.py gives them for these families (Flux 2's
# [3] there indexes a fourth rope axis, which these tiny models do not have).
UPSTREAM = (0, 33, 0)
FLUX_UPSTREAM = {"txt_ids_dims": []}
CHROMA_UPSTREAM = {"txt_ids_dims": [], "vec_in_dim": None}


UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1], "use_spatial_transformer": True, "context_dim": 16,
    "num_head_channels": 16, "use_linear_in_transformer": True, "legacy": False,
}
# conv_in, level 0 (res+attn, downsample), level 1 (res+attn): 4 input blocks; 2 levels x 2: 4 output blocks.
UNET_BLOCKS = names("input_blocks", 4) + ["middle_block"] + names("output_blocks", 4)
SDXL_UNET = {**UNET, "num_classes": "sequential", "adm_in_channels": 8, "transformer_depth": [0, 2],
             "transformer_depth_output": [0, 0, 2, 2]}

FLUX = {
    "in_channels": 4, "out_channels": 4, "vec_in_dim": 8, "context_in_dim": 16, "hidden_size": 32,
    "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 3, "axes_dim": [4, 6, 6],
    "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": False,
}
FLUX2 = {**FLUX, "global_modulation": True, "vec_in_dim": None, "mlp_silu_act": True, "qkv_bias": False,
         "ops_bias": False}
DOUBLE_SINGLE = names("double_blocks", 2) + names("single_blocks", 3)

CHROMA = {  # in_channels is after patchifying (4 x 2 x 2); out_dim of the approximator is hidden_size
    "in_channels": 16, "out_channels": 16, "context_in_dim": 16, "hidden_size": 32, "mlp_ratio": 2.0,
    "num_heads": 2, "depth": 2, "depth_single_blocks": 3, "axes_dim": [4, 6, 6], "theta": 10000,
    "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 32, "hidden_dim": 16, "n_layers": 2,
}

MMDIT = {  # hidden size is 64 * depth
    "in_channels": 4, "out_channels": 4, "patch_size": 2, "depth": 3, "input_size": None, "adm_in_channels": 8,
    "pos_embed_max_size": 8, "num_patches": 64,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 16, "out_features": 192}},
}

WAN = {
    "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 8, "in_dim": 4, "dim": 32, "ffn_dim": 64,
    "freq_dim": 16, "text_dim": 16, "out_dim": 4, "num_heads": 2, "num_layers": 3,
}

QWEN_IMAGE = {
    "patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 3, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 16, "axes_dims_rope": (4, 6, 6),
}

LUMINA2 = {
    "patch_size": 2, "in_channels": 4, "dim": 32, "n_layers": 3, "n_refiner_layers": 2, "n_heads": 2,
    "n_kv_heads": 1, "multiple_of": 16, "ffn_dim_multiplier": 2.0, "qk_norm": True, "cap_feat_dim": 16,
    "axes_dims": [4, 6, 6], "axes_lens": [64, 32, 32],
}
# Z-Image's modulation takes a 256-wide time embedding, so dim >= 256.
Z_IMAGE = {**LUMINA2, "dim": 256, "n_kv_heads": 2, "axes_dims": [32, 48, 48], "z_image_modulation": True,
           "time_scale": 1000.0, "pad_tokens_multiple": 8}
REFINERS = ("noise_refiner", "context_refiner")  # run before the layers, but stay resident

HUNYUAN = {
    "in_channels": 4, "out_channels": 4, "vec_in_dim": 8, "context_in_dim": 16, "hidden_size": 32,
    "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 3, "axes_dim": [4, 6, 6],
    "theta": 256, "patch_size": [1, 2, 2], "qkv_bias": True, "guidance_embed": False, "byt5": False,
    "meanflow": False, "use_cond_type_embedding": False, "vision_in_dim": None,
}
HUNYUAN_1_5 = {**HUNYUAN, "vec_in_dim": None, "depth_single_blocks": 0, "use_cond_type_embedding": True,
               "vision_in_dim": 24}

LTXV = {
    "in_channels": 4, "cross_attention_dim": 32, "attention_head_dim": 16, "num_attention_heads": 2,
    "caption_channels": 16, "num_layers": 3,
}

OPENAI = "modules.diffusionmodules.openaimodel"
FAMILIES = [
    Family("sd15_unet", OPENAI, "UNetModel", UNET, UNET_BLOCKS, lambda m: m(x4(), t(), context=ctx())),
    Family("sdxl_unet", OPENAI, "UNetModel", SDXL_UNET, UNET_BLOCKS,
           lambda m: m(x4(), t(), context=ctx(), y=torch.randn(1, 8))),
    Family("flux", "flux.model", "Flux", FLUX, DOUBLE_SINGLE, lambda m: m(x4(), t(), ctx(), y=torch.randn(1, 8)),
           upstream_kwargs=FLUX_UPSTREAM),
    Family("flux2", "flux.model", "Flux", FLUX2, DOUBLE_SINGLE, lambda m: m(x4(), t(), ctx()),
           upstream_kwargs=FLUX_UPSTREAM),
    Family("chroma", "chroma.model", "Chroma", CHROMA, DOUBLE_SINGLE,
           lambda m: m(x4(), t(), ctx(), torch.tensor([0.0])), absent=("distilled_guidance_layer.layers",),
           upstream_kwargs=CHROMA_UPSTREAM),
    Family("sd3_mmdit", "modules.diffusionmodules.mmdit", "OpenAISignatureMMDITWrapper", MMDIT,
           names("joint_blocks", 3), lambda m: m(x4(), t(), context=ctx(), y=torch.randn(1, 8))),
    Family("wan", "wan.model", "WanModel", WAN, names("blocks", 3), lambda m: m(x5(), t(), ctx(8))),
    Family("qwen_image", "qwen_image.model", "QwenImageTransformer2DModel", QWEN_IMAGE,
           names("transformer_blocks", 3), lambda m: m(x5(t=1), t(), ctx())),
    Family("lumina2", "lumina.model", "NextDiT", LUMINA2, names("layers", 3),
           lambda m: m(x4(), t(), ctx(), 5), absent=REFINERS),
    Family("z_image", "lumina.model", "NextDiT", Z_IMAGE, names("layers", 3),
           lambda m: m(x4(), t(), ctx(), 5), absent=REFINERS),
    Family("hunyuan_video", "hunyuan_video.model", "HunyuanVideo", HUNYUAN, DOUBLE_SINGLE,
           lambda m: m(x5(), t(), ctx(), y=torch.randn(1, 8)), absent=("txt_in.individual_token_refiner.blocks",),
           upstream_kwargs={"meanflow_sum": False}),
    Family("hunyuan_video_1_5", "hunyuan_video.model", "HunyuanVideo", HUNYUAN_1_5, names("double_blocks", 2),
           lambda m: m(x5(), t(), ctx()), upstream_kwargs={"meanflow_sum": True}),
    Family("ltxv", "lightricks.model", "LTXVModel", LTXV, names("transformer_blocks", 3),
           lambda m: m(x5(), t(), ctx(), None)),
    Family("auraflow", "aura.mmdit", "MMDiT",
           {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 32, "n_layers": 5, "n_double_layers": 2,
            "n_heads": 2, "global_conddim": 32, "cond_seq_dim": 16, "max_seq": 64},
           names("double_layers", 2) + names("single_layers", 3), lambda m: m(x4(), t(), ctx())),
]

@pytest.fixture
def blocks_module(pack):
    from comfyui_streamloader.loader import blocks

    return blocks


def build(family: Family, comfyui_version: tuple[int, ...]) -> torch.nn.Module:
    """The family's real ComfyUI class, tiny, with seeded small weights (disable_weight_init leaves them empty)."""
    import comfy.ops

    try:
        cls = getattr(importlib.import_module(f"comfy.ldm.{family.module}"), family.cls)
    except (ImportError, AttributeError) as e:
        pytest.skip(f"comfy.ldm.{family.module}.{family.cls} is not in this ComfyUI: {e}")
    torch.manual_seed(SEED)
    with _weights_made_at_init():
        model = cls(operations=comfy.ops.disable_weight_init, **family.kwargs_for(comfyui_version))
    for p in model.parameters():
        p.copy_(torch.randn_like(p) * 0.02)
    return model


@contextlib.contextmanager
def _weights_made_at_init():
    """With DynamicVRAM on (upstream on a GPU), core's ops make no weights until a state dict is
    loaded; this test fills its weights itself, so the model is built as without DynamicVRAM."""
    memory_management = importlib.import_module("comfy.memory_management") \
        if importlib.util.find_spec("comfy.memory_management") else None
    enabled = getattr(memory_management, "aimdo_enabled", False)
    if enabled:
        memory_management.aimdo_enabled = False
    try:
        yield
    finally:
        if enabled:
            memory_management.aimdo_enabled = True


def execution_order(model: torch.nn.Module, blocks, run) -> list[str]:
    """Block names in the order one forward pass enters them (a block's consecutive calls count once).

    Every submodule of a block is hooked, since some models call a block's children and not the block
    (the UNet's forward_timestep_embed iterates a TimestepEmbedSequential).
    """
    owner = {}
    for name, block in blocks:
        for module in block.modules():
            owner[id(module)] = name
    entered: list[str] = []

    def hook(module, _args):
        name = owner[id(module)]
        if not entered or entered[-1] != name:
            entered.append(name)

    handles = [m.register_forward_pre_hook(hook) for _, block in blocks for m in block.modules()]
    try:
        torch.manual_seed(SEED)
        out = run(model)
    finally:
        for h in handles:
            h.remove()
    assert torch.is_tensor(out) and out.numel() > 0
    return entered


def assert_blocks_own_their_parameters(model, blocks):
    owner: dict[int, str] = {}
    for name, block in blocks:
        assert model.get_submodule(name) is block, f"{name} is not where discover_blocks says"
        params = list(block.named_parameters())
        assert params, f"{name} has no parameters"
        for pname, p in params:
            assert model.get_parameter(f"{name}.{pname}") is p, f"{name}.{pname} is not the model's parameter"
            assert id(p) not in owner, f"{name}.{pname} is also in {owner[id(p)]}"
            owner[id(p)] = name
    assert owner.keys() <= {id(p) for p in model.parameters()}


def check(family: Family, blocks_module, comfyui_version):
    model = build(family, comfyui_version)
    blocks = blocks_module.discover_blocks(model)
    found = [name for name, _ in blocks]
    assert found == family.expected
    for resident in family.absent:
        assert model.get_submodule(resident) is not None  # the list exists in this class...
        assert not [n for n in found if n == resident or n.startswith(resident + ".")]  # ...and is not streamed
    assert_blocks_own_their_parameters(model, blocks)
    assert execution_order(model, blocks, family.run) == family.expected


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.id)
def test_family_blocks_in_execution_order(family, blocks_module, comfyui_version):
    check(family, blocks_module, comfyui_version)
