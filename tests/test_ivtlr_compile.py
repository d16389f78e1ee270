"""IVT-LR's training forward under torch.compile: where dynamo breaks the graph (only in the host-side planning
and transformers' own vision tower, never in the per-step rollout), and the host synchronisations of one
forward + backward (a fixed, justified few, independent of the number of latent steps, samples and layers)."""
import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

from mmlatent.models import IVTLR
from mmlatent.models.tiny import LATENT_ID, synthetic_batch, tiny_qwen2_vl

# Host-side work that breaks the graph by design: input validation and the layout plan (see the comments at
# each site), and transformers' vision tower (its own data-dependent sequence lengths).
PLANNING = ("models/backbones/base.py", "models/backbones/qwen_vl.py", "models/ivtlr/layout.py")
# The per-step rollout and everything it calls: no graph break may start here.
HOT_PATH = ("models/ivtlr/rollout.py", "models/attention.py", "kernels/")


def batch_for(model, num_latents, seed=0):
    B = len(num_latents)
    return synthetic_batch(model, images=[[(16, 24)]] * B, prompt_lengths=[3, 6, 4][:B],
                           answer_lengths=[4, 2, 3][:B], num_latents=num_latents, seed=seed)


def test_graph_breaks_only_in_planning_and_the_vision_tower():
    model = tiny_qwen2_vl()
    wrapper = IVTLR(model, LATENT_ID, k=2)
    explanation = torch._dynamo.explain(wrapper)(**batch_for(model, [2, 3]))
    assert explanation.op_count > 0
    for reason in explanation.break_reasons:
        ours = [f for f in reason.user_stack if "/mmlatent/" in f.filename]
        where = ours[-1].filename.split("/mmlatent/")[-1] if ours else ""
        assert not where.startswith(HOT_PATH), (where, ours[-1].lineno, reason.reason)
        assert not where or where.startswith(PLANNING), (where, ours[-1].lineno, reason.reason)


SYNCING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
           torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy,
           torch.Tensor.nonzero, torch.nonzero}


class HostSyncs(TorchFunctionMode):
    """Counts the calls mmlatent's own code makes that read a tensor on the host (a device synchronisation on a
    GPU), by site. The layout plan's work on its host copy (after its one ``.cpu()``) reads host tensors only and
    is not counted."""

    def __init__(self):
        super().__init__()
        self.sites = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            frame = sys._getframe(1)
            module = frame.f_globals.get("__name__", "")
            host_planning = module.endswith("ivtlr.layout") and func is not torch.Tensor.cpu
            if module.startswith("mmlatent") and not host_planning:
                self.sites[f"{module}.{frame.f_code.co_name}"] += 1
        return func(*args, **(kwargs or {}))


def test_host_syncs_of_a_training_step_are_few_and_fixed():
    model = tiny_qwen2_vl()
    wrapper = IVTLR(model, LATENT_ID, k=2)
    seen = []
    for num_latents in ([1, 1], [3, 2], [3, 3, 2]):
        batch = batch_for(model, num_latents)
        with HostSyncs() as syncs:
            wrapper(**batch).loss.backward()
        seen.append(dict(syncs.sites))
    # one each: the image-token count and the patch count (validation before any work), the layout's host copy
    assert seen[0] == {"mmlatent.models.backbones.base.check_images": 1,
                       "mmlatent.models.backbones.qwen_vl._check_pixels": 1,
                       "mmlatent.models.ivtlr.layout.__init__": 1}
    assert seen[1] == seen[2] == seen[0]
