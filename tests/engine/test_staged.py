"""The stage-wise block walk gives the same activations and Hessians as re-running the whole block."""

import torch

from qtool.calib.hessian import HessianCollector
from qtool.engine.blocks import BlockRunner, materialize, skeleton
from qtool.engine.staged import StagedBlock
from qtool.io.arch import arch_of
from qtool.io.source import open_model


def test_staged_walk_matches_full_block_forwards(tiny_llama):
    src = open_model(tiny_llama)
    cfg, arch = src.config, arch_of(src.config)
    skel = skeleton(cfg)
    block = materialize(skel.get_submodule("model.layers.0"), "model.layers.0.", src)
    runner = BlockRunner(skel, cfg, 32)
    x = torch.randn(20, 32, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    staged = StagedBlock(block, arch, runner, x.clone(), batch=8)
    for gi, group in enumerate(arch.linear_groups):
        ref = HessianCollector(block, [group[0]]).run(lambda b: runner(block, b), x.split(8))[group[0]]
        got = staged.hessian(gi, group[0])
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), group
        with torch.no_grad():  # "quantize" the group: later stages must see the changed weights
            for lin in group:
                w = block.get_submodule(lin).weight
                w.copy_(torch.round(w * 16) / 16)
    out = staged.output()
    full = torch.cat([runner(block, b) for b in x.split(8)])
    assert torch.equal(out, full)
