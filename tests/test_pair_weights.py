"""The per-pair ``weight`` column reaches the trainer's loss: with weight 0 on every pair of a batch but one, the
loss and every gradient are that one pair's (scaled by its weight over the batch size, the loss being the
micro-batch mean), so a trainer that ignored the column (or renormalised it away) fails."""

from __future__ import annotations

import copy

import pytest
import torch
from trainer_helpers import TOKENIZER, config, demo_rows, tiny_model

from fastpref import PreferenceTrainer

PAIRS, KEPT, KEPT_WEIGHT = 5, 2, 1.7


def _moved(model, seed: int = 1):
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return moved


def _loss_and_grads(tmp_path, rows, loss_type: str):
    initial = tiny_model()
    trainer = PreferenceTrainer(_moved(initial), ref_model=initial, args=config(tmp_path, loss_type=loss_type),
                                train_dataset=rows, processing_class=TOKENIZER)
    features = [trainer.train_dataset[i] for i in range(len(rows))]
    batch = trainer._prepare_inputs(trainer.data_collator(features))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_weight_zero_on_all_pairs_but_one_gives_that_pairs_gradient(loss_type, tmp_path):
    rows = demo_rows("train", PAIRS)
    weights = [KEPT_WEIGHT if i == KEPT else 0.0 for i in range(PAIRS)]
    weighted_loss, weighted = _loss_and_grads(tmp_path / "weighted", rows.add_column("weight", weights), loss_type)
    single_loss, single = _loss_and_grads(tmp_path / "single", rows.select([KEPT]), loss_type)
    scale = KEPT_WEIGHT / PAIRS
    torch.testing.assert_close(weighted_loss, scale * single_loss, rtol=1e-5, atol=1e-7)
    for got, expected in zip(weighted, single, strict=True):
        torch.testing.assert_close(got, scale * expected, rtol=1e-4, atol=2e-6)
    assert max(g.abs().max() for g in single) > 1e-3  # gradients far above the tolerance
