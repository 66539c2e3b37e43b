"""CUDA paths: bf16-mixed with SDPA's fused kernels under the first-order hypergradient, the exact mode's math
kernel, gradient checkpointing's memory, and the throughput benchmark. Run with ``pytest -m gpu``; skipped
without CUDA."""

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from boost_lightning.bench.batches import random_batch
from boost_lightning.bilevel import HypergradientOptions, exact_hypergradient, first_order_hypergradient
from boost_lightning.models import PolicyModel, WeightHead
from boost_lightning.module import BoostModule
from boost_lightning.weightings import Learned

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CONFIG = {"model_type": "llama", "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 2048,
          "pad_token_id": 0, "tie_word_embeddings": False}


def cuda_batch(seed, batch_size=4, seq_len=128):
    return {k: v.cuda() if torch.is_tensor(v) else v
            for k, v in random_batch(CONFIG["vocab_size"], batch_size, seq_len, seed=seed).items()}


def make_policy(**kw):
    policy = PolicyModel(config=CONFIG, r=8, lora_alpha=16, seed=0, **kw).cuda()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in policy.trainable_named_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g).cuda() * 0.02)
    return policy.train()


def test_bf16_mixed_boost_trains_with_fused_sdpa_kernels_only():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    policy = PolicyModel(config=CONFIG, r=8, lora_alpha=16, seed=0)
    module = BoostModule(policy, Learned(WeightHead()), hypergradient=HypergradientOptions(lookahead_lr=0.1))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    items = [{"inner": random_batch(CONFIG["vocab_size"], 4, 128, seed=i),
              "outer": random_batch(CONFIG["vocab_size"], 4, 128, seed=100 + i)} for i in range(3)]
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="gpu", devices=1, precision="bf16-mixed")
    # No math kernel allowed: the first-order hypergradient must not need a double backward through attention.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        trainer.fit(module, train_dataloaders=DataLoader(items, batch_size=None))
    assert module.inner_steps == 3 and module.outer_steps == 3 and sum(module.faults.values()) == 0
    moved = {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach().cpu())}
    assert any("lora_" in n for n in moved) and any(n.startswith("weighting.head.") for n in moved)


def test_exact_hypergradient_forces_math_attention_and_matches_eager():
    inner_batch, val_batch = cuda_batch(0), cuda_batch(1)
    results = []
    for attn in ("sdpa", "eager"):
        policy = make_policy(attn_implementation=attn)
        params = policy.trainable_named_parameters()
        results.append(exact_hypergradient(params, lambda p, m=policy: m.functional_losses(inner_batch, p),
                                           lambda p, m=policy: m.functional_losses(val_batch, p).mean(),
                                           torch.ones(4, device="cuda"), lr=1e-2).grad_weights)
    torch.testing.assert_close(results[0], results[1], rtol=1e-3, atol=1e-3 * results[1].abs().max().item())


def test_bf16_first_order_hypergradient_tracks_fp32():
    inner_batch, val_batch = cuda_batch(0, batch_size=8), cuda_batch(1)
    policy = make_policy()
    params = policy.trainable_named_parameters()
    results = []
    for enabled in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled):
            base = policy.trajectory_forward(inner_batch).loss.detach()
            results.append(first_order_hypergradient(
                params, lambda p: policy.functional_losses(inner_batch, p),
                lambda p: policy.functional_losses(val_batch, p).mean(), lr=1e-2, base_losses=base,
                eps=1e-2).grad_weights)
    assert torch.nn.functional.cosine_similarity(results[0], results[1], dim=0) > 0.9


def test_gradient_checkpointing_lowers_peak_memory_and_keeps_the_hypergradient():
    inner_batch, val_batch = cuda_batch(0, seq_len=1024), cuda_batch(1, seq_len=1024)
    peaks, grads = [], []
    for checkpointing in (False, True):
        policy = make_policy(gradient_checkpointing=checkpointing)
        params = policy.trainable_named_parameters()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = policy.trajectory_forward(inner_batch).loss.detach()
        hg = first_order_hypergradient(params, lambda p, m=policy: m.functional_losses(inner_batch, p),
                                       lambda p, m=policy: m.functional_losses(val_batch, p).mean(), lr=1e-2,
                                       base_losses=base)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        grads.append(hg.grad_weights)
        del policy, params
        torch.cuda.empty_cache()
    assert peaks[1] < 0.8 * peaks[0], peaks
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4 * grads[0].abs().max().item())


def test_perf_benchmark_runs_on_cuda(capsys):
    from boost_lightning.bench.perf import main

    rows = main(["--steps", "4", "--warmup", "1", "--batch-size", "2", "--seq-len", "128", "--precision", "bf16-mixed",
                 "--device", "cuda", "--methods", "sft,boost_k4"])
    assert [r["method"] for r in rows] == ["sft", "boost_k4"]
    assert all(r["tokens_per_s"] > 0 and r["peak_mib"] > 0 for r in rows)
    assert "accelerator=gpu" in capsys.readouterr().out
