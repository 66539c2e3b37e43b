"""Drop-in use: a user's own LightningModule with WeightHead, the hypergradient and BoostDataModule (no BoostModule).

The class below is the README's "Use the pieces in your own LightningModule" example, kept in sync by this test.
"""

import torch
from lightning.pytorch import LightningModule, Trainer
from transformers import AutoConfig, AutoModelForCausalLM

from boost_lightning.bilevel import first_order_hypergradient
from boost_lightning.data.datamodule import BoostDataModule
from boost_lightning.models import WeightHead
from boost_lightning.objectives import weighted_loss


def agent_nll(model, batch, params=None):
    """Per-trajectory token-mean NLL over agent tokens, optionally at other parameter values."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    out = torch.func.functional_call(model, params, (), inputs, strict=False) if params else model(**inputs)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    mask = labels != -100
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


class MyReweightedSFT(LightningModule):
    def __init__(self, model, lr=1e-3):
        super().__init__()
        self.automatic_optimization = False
        self.model, self.lr = model, lr
        self.head = WeightHead(features=["loss", "reward", "source", "length"])

    def training_step(self, batch, batch_idx):
        inner, outer = batch["inner"], batch["outer"]
        policy_opt, head_opt = self.optimizers()
        losses = agent_nll(self.model, inner)
        feats = torch.stack([losses.detach(), inner["reward"], inner["is_synthetic"],
                             torch.log1p(inner["length"].float())], 1)
        self.head.observe(feats)
        weights = self.head(feats).detach()
        policy_opt.zero_grad()
        self.manual_backward(weighted_loss(losses, weights))
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        hg = first_order_hypergradient(params, lambda p: agent_nll(self.model, inner, p),
                                       lambda p: agent_nll(self.model, outer, p).mean(), lr=self.lr,
                                       base_losses=losses.detach())
        head_opt.zero_grad()
        self.manual_backward((hg.grad_weights * self.head(feats)).sum())
        head_opt.step()
        policy_opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.model.parameters(), lr=self.lr), torch.optim.Adam(self.head.parameters())]


def test_drop_in_user_module_trains_both_levels(tiny_tokenizer, tiny_llama_config, tmp_path):
    import json

    rows = [{"messages": [{"role": "user", "content": "You are at (0, 0). Goal is at (3, 4)."},
                          {"role": "assistant", "content": f"move {d}"}], "reward": float(i % 3)}
            for i, d in enumerate(["north", "south", "east", "west"] * 4)]
    paths = {}
    for split in ("real", "synthetic", "validation"):
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text("\n".join(json.dumps(r) for r in rows))
    data = BoostDataModule(real=str(paths["real"]), synthetic=str(paths["synthetic"]),
                           validation=str(paths["validation"]), tokenizer=tiny_tokenizer, batch_size=4,
                           validation_batch_size=4, cache_dir=str(tmp_path / "cache"))
    cfg = dict(tiny_llama_config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    module = MyReweightedSFT(model)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu").fit(module, datamodule=data)
    moved = {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}
    assert any(n.startswith("head.") for n in moved) and any(n.startswith("model.") for n in moved)
