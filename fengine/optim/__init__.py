"""Gradient transformations (optax style) and optimizers with torch.optim's exact kernels."""

from fengine.optim.alias import (
    AdagradState as AdagradState,
    AdamState as AdamState,
    RMSpropState as RMSpropState,
    SgdState as SgdState,
    adagrad as adagrad,
    adam as adam,
    adamw as adamw,
    rmsprop as rmsprop,
    sgd as sgd,
)
from fengine.optim.base import (
    EmptyState as EmptyState,
    GradientTransformation as GradientTransformation,
    Hyper as Hyper,
    PartitionState as PartitionState,
    apply_updates as apply_updates,
    chain as chain,
    collect_metrics as collect_metrics,
    hyperparams as hyperparams,
    identity as identity,
    partition as partition,
    resolve as resolve,
    set_to_zero as set_to_zero,
    step_params as step_params,
)
from fengine.optim.paramwise import (
    ParamGroups as ParamGroups,
    convnext_layer_id as convnext_layer_id,
    convnext_stage_id as convnext_stage_id,
    layer_decay as layer_decay,
    paramwise as paramwise,
)
from fengine.optim.scaling import scale_lr as scale_lr
from fengine.optim.torch_wrap import (
    TorchOptimizerState as TorchOptimizerState,
    from_torch as from_torch,
)
from fengine.optim.transforms import (
    ClipByGlobalNormState as ClipByGlobalNormState,
    add_decayed_weights as add_decayed_weights,
    clip_by_global_norm as clip_by_global_norm,
    clip_by_value as clip_by_value,
    global_norm as global_norm,
    scale as scale,
    scale_by_schedule as scale_by_schedule,
)
