"""FP8 for the frozen base: torchao's float8 GEMMs in the forward and input gradient of the projections
under PEFT's LoRA layers (the weight gradient of a frozen base is never computed); whether a device can
run them, and the spec error when ``training.fp8: on`` cannot be honoured."""
from __future__ import annotations

import os

import torch

#: torchao float8 recipe: "tensorwise" (one dynamic scale per tensor, e4m3 forward / e5m2 gradients:
#: torchao's default and its fastest) or "rowwise" (a scale per row, e4m3 throughout: more accurate,
#: slower kernels). The environment variable is for benchmarks; the spec only says on/off/auto.
FP8_RECIPE_ENV = "LORA_JOBS_FP8_RECIPE"
FP8_RECIPES = ("tensorwise", "rowwise")


def fp8_recipe() -> str:
    recipe = os.environ.get(FP8_RECIPE_ENV, "tensorwise")
    return recipe if recipe in FP8_RECIPES else "tensorwise"


def fp8_support(device) -> tuple[bool, str]:
    """Whether FP8 training of the frozen projections can run on ``device``; if not, why."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "not a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"this GPU (compute capability {major}.{minor}) has no FP8 matmuls; they need 8.9+"
    try:
        import torchao.float8  # noqa: F401
    except Exception as err:  # noqa: BLE001 - not installed, or built for another torch
        return False, f"torchao's float8 does not import ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    return True, "ok"


def refuse_fp8(why: str):
    """Fail planning: ``training.fp8`` is on, but FP8 cannot run here (``why``)."""
    from jobs.errors import Problem, SpecError

    raise SpecError([Problem("training.fp8", f"training.fp8 is on, but {why}",
                             "use a GPU with FP8 matmuls (L4, L40S, H100, H200, B200 and newer) with torchao "
                             "installed, or set training.fp8: auto (FP8 where it can run) or off")])


def _fp8_candidate(module, fqn: str) -> bool:
    # only the frozen nn.Linear under a PEFT LoRA layer; FP8 GEMMs want both dims divisible by 16
    return (type(module) is torch.nn.Linear and fqn.split(".")[-1] == "base_layer"
            and not module.weight.requires_grad and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_fp8(model) -> int:
    """Swap the frozen base projections under PEFT's LoRA layers for FP8 ones (torchao's float8).

    Their forward and input-gradient GEMMs then run in FP8 with dynamic scaling; the weight
    gradient is never computed (see :func:`_frozen_float8_linear`). LoRA A/B, the embeddings and
    the lm_head keep their dtype. The weights are shared, not copied. :func:`remove_fp8` puts the
    original modules back. Returns how many were swapped.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    recipe = fp8_recipe()
    config = Float8LinearConfig() if recipe == "tensorwise" else Float8LinearConfig.from_recipe_name(recipe)
    originals: dict[str, torch.nn.Module] = {}

    def pick(module, fqn):
        if _fp8_candidate(module, fqn):
            originals[fqn] = module
            return True
        return False

    convert_to_float8_training(model, module_filter_fn=pick, config=config)
    frozen = _frozen_float8_linear()
    for fqn in originals:
        model.get_submodule(fqn).__class__ = frozen
    model.__dict__["_fastpath_fp8_originals"] = originals
    return len(originals)


_FROZEN_FLOAT8: list[type] = []


def _frozen_float8_linear() -> type:
    """torchao's ``Float8Linear`` for a frozen weight: forward and input gradient only.

    torchao's matmul (``matmul_with_hp_or_float8_args``) always computes the weight gradient as
    well: a third GEMM that a frozen base throws away, and one whose inner dimension is the
    micro-batch's token count, which FP8 GEMMs need divisible by 16, so ``torch.compile`` with
    dynamic shapes refuses it ("Expected self.size(1) to be divisible by 16", GPU call 8). This
    one does the same casts (torchao's ``hp_tensor_to_float8_dynamic``, the config's scaling) for
    the two GEMMs that a frozen projection needs, and saves only the weight for the backward, not
    its input.
    """
    if _FROZEN_FLOAT8:
        return _FROZEN_FLOAT8[0]
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole

    def cast(t, cast_config, mm_config, role, dim, config):
        return hp_tensor_to_float8_dynamic(
            t, cast_config.target_dtype, mm_config, gemm_input_role=role,
            scaling_granularity=cast_config.scaling_granularity,
            axiswise_dim=get_maybe_axiswise_dim(dim, cast_config.scaling_granularity),
            round_scales_to_power_of_2=config.round_scales_to_power_of_2)

    @torch._dynamo.allow_in_graph
    class FrozenFloat8Matmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight_t, mm_config, config):
            ctx.save_for_backward(weight_t)
            ctx.mm_config, ctx.config = mm_config, config
            x8 = cast(x.reshape(-1, x.shape[-1]), config.cast_config_input, mm_config, GemmInputRole.INPUT, -1, config)
            w8 = cast(weight_t, config.cast_config_weight, mm_config, GemmInputRole.WEIGHT, 0, config)
            out = torch.mm(x8, w8)
            return out.reshape(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad_out):
            (weight_t,) = ctx.saved_tensors
            c = ctx.config
            g = grad_out.reshape(-1, grad_out.shape[-1])
            g8 = cast(g, c.cast_config_grad_output, ctx.mm_config, GemmInputRole.GRAD_OUTPUT, -1, c)
            w8 = cast(weight_t, c.cast_config_weight_for_grad_input, ctx.mm_config, GemmInputRole.WEIGHT, -1, c)
            grad_in = torch.mm(g8, w8.t())
            return grad_in.reshape(*grad_out.shape[:-1], grad_in.shape[-1]), None, None, None

    class FrozenFloat8Linear(Float8Linear):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled():
                input = input.to(torch.get_autocast_gpu_dtype())
            out = FrozenFloat8Matmul.apply(input, self.weight.t(), self.linear_mm_config, self.config)
            return out if self.bias is None else out + self.bias.to(out.dtype)

    _FROZEN_FLOAT8.append(FrozenFloat8Linear)
    return FrozenFloat8Linear


def remove_fp8(model) -> int:
    """Put back the bf16 projections that :func:`apply_fp8` swapped; returns how many (0 when none)."""
    originals = model.__dict__.pop("_fastpath_fp8_originals", None) or {}
    for fqn, module in originals.items():
        parent, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, module)
    return len(originals)
