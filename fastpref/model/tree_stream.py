"""Tree-packed preference streams: every pair as [x, y_w, y_l] with the prompt x stored once.

Layout of one micro-batch (batch 1, L rows, pairs back to back):

    pair i:   x_i (a_i tokens)       y_w,i (m_i tokens)            y_l,i (n_i tokens)
    position: o .. o+a_i−1           o+a_i .. o+a_i+m_i−1          o+a_i .. o+a_i+n_i−1

(o = ``position_offset``, the length of a cached shared prefix, else 0). A query row q attends to key row k
iff both belong to the same pair, k ≤ q in the stream, and not (q ∈ y_l and k ∈ y_w): y_l sees x but not y_w,
pairs never see each other; with a cached prefix every row also sees all prefix columns. So each response is
computed exactly as if [x, y] were a sequence of its own, and the prompt's transformer work is done once.

Scoring: x_i's last row predicts the first token of both responses; y_w[j] is predicted by the row of y_w[j−1].
The rows that predict something are gathered by ``row_index`` (x_i's last row appears twice: once in the chosen
sequence with target y_w[0], once in the rejected one with target y_l[0]); ``labels`` holds the targets and
``cu_seqlens`` the boundaries of the 2B scored sequences among the gathered rows, chosen sequences first (s < B
is pair s's chosen response, s ≥ B pair s−B's rejected one), the collator's order. The gather is of D-sized
hidden rows; its backward sums the two contributions of a shared row, so no transformer work is duplicated.

:func:`build_branch_tree` generalises the layout to K responses per prompt ([x, y_1, …, y_K], listwise data): each
branch sees x and itself, never a sibling.

Masks: :func:`tree_attention_mask` (4D boolean, True = attend; what sdpa takes), :func:`tree_additive_mask`
(4D float, 0 / dtype-min; what eager attention takes), :func:`tree_block_mask` (flex_attention ``BlockMask``;
what to use on CUDA), and :func:`attention_mask_for` picks by the model's attention implementation. The errors
for attention setups that would silently mix sequences live in :mod:`fastpref.model.attention`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from fastpref.data.tokenization import strip_prefix
from fastpref.model.attention import FlashAttentionTreeError, UnsafeAttentionError, attention_implementation

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # role ids of a row


@dataclass(frozen=True)
class TreeBatch:
    """One micro-batch as a tree-packed stream (see the module docstring for the layout).

    input_ids:    LongTensor [1, L] tokens, pairs back to back as [x, y_w, y_l].
    position_ids: LongTensor [1, L] positions (restart at ``position_offset`` for each pair; y_l continues x).
    pair_ids:     LongTensor [L] index of the pair each row belongs to.
    role_ids:     LongTensor [L] PROMPT (0), CHOSEN (1) or REJECTED (2).
    row_index:    LongTensor [n] stream rows that predict a response token, chosen sequences first.
    labels:       LongTensor [n] the token predicted by each gathered row.
    cu_seqlens:   LongTensor [2B+1] boundaries of the 2B scored sequences among the gathered rows.
    num_pairs:    B.
    position_offset: length of the shared prefix the positions start after (0 without one).
    max_position: the largest position id + 1 (a Python int computed when building, so checks need no sync).
    pair_lengths: the stream rows of each pair (or prompt with its branches), in order (Python ints; empty when
                  not known, e.g. a tree rebuilt from a batch without them).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    pair_ids: torch.Tensor
    role_ids: torch.Tensor
    row_index: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    num_pairs: int
    position_offset: int = 0
    max_position: int = 0
    pair_lengths: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str) -> TreeBatch:
        """The same batch with every tensor on `device` (non-blocking from pinned memory)."""
        return replace(self, **{name: getattr(self, name).to(device, non_blocking=True) for name in
                                ("input_ids", "position_ids", "pair_ids", "role_ids", "row_index", "labels",
                                 "cu_seqlens")})


def _check_token_lists(name: str, lists: Sequence[Sequence[int]], num_pairs: int) -> None:
    if len(lists) != num_pairs:
        raise ValueError(f"{name} has {len(lists)} entries, expected one per pair ({num_pairs})")
    for i, ids in enumerate(lists):
        if len(ids) == 0:
            raise ValueError(f"{name}[{i}] is empty: every prompt and response needs at least one token")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids):
            raise ValueError(f"{name}[{i}] must hold non-negative Python ints (token ids)")


def build_tree_batch(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
                     rejected_ids: Sequence[Sequence[int]], *, position_offset: int = 0) -> TreeBatch:
    """Lay out B pairs as one tree-packed stream (CPU tensors; call it in the collator, then ``.to(device)``).

    Args:
        prompt_ids, chosen_ids, rejected_ids: per pair the token ids of x, y_w and y_l (non-empty lists).
        position_offset: positions start here (the length of a cached shared prefix, see
            :mod:`fastpref.model.prefix_kv`), 0 for a stream of its own.
    """
    num_pairs = len(prompt_ids)
    if num_pairs == 0:
        raise ValueError("prompt_ids is empty: a tree batch needs at least one pair")
    _check_token_lists("prompt_ids", prompt_ids, num_pairs)
    _check_token_lists("chosen_ids", chosen_ids, num_pairs)
    _check_token_lists("rejected_ids", rejected_ids, num_pairs)
    if position_offset < 0:
        raise ValueError(f"position_offset must be >= 0, got {position_offset}")

    tokens, positions, pairs, roles = [], [], [], []
    chosen_rows, chosen_labels, rejected_rows, rejected_labels = [], [], [], []
    chosen_counts, rejected_counts, pair_lengths = [], [], []
    max_position = 0
    for pair, (x, y_w, y_l) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids)):
        start, a, m, n = len(tokens), len(x), len(y_w), len(y_l)
        last_prompt_row = start + a - 1
        tokens += [*x, *y_w, *y_l]
        positions += [*range(position_offset, position_offset + a + m),
                      *range(position_offset + a, position_offset + a + n)]
        pairs += [pair] * (a + m + n)
        roles += [PROMPT] * a + [CHOSEN] * m + [REJECTED] * n
        # y_w[0] from x's last row, y_w[j] from y_w[j-1]'s row; the same for y_l (whose rows start after y_w).
        chosen_rows += [last_prompt_row, *range(start + a, start + a + m - 1)]
        chosen_labels += y_w
        rejected_rows += [last_prompt_row, *range(start + a + m, start + a + m + n - 1)]
        rejected_labels += y_l
        chosen_counts.append(m)
        rejected_counts.append(n)
        pair_lengths.append(a + m + n)
        max_position = max(max_position, position_offset + a + max(m, n))

    counts = torch.tensor(chosen_counts + rejected_counts, dtype=torch.long)
    return TreeBatch(
        input_ids=torch.tensor([tokens], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        pair_ids=torch.tensor(pairs, dtype=torch.long),
        role_ids=torch.tensor(roles, dtype=torch.long),
        row_index=torch.tensor(chosen_rows + rejected_rows, dtype=torch.long),
        labels=torch.tensor(chosen_labels + rejected_labels, dtype=torch.long),
        cu_seqlens=torch.nn.functional.pad(counts.cumsum(0), (1, 0)),
        num_pairs=num_pairs,
        position_offset=position_offset,
        max_position=max_position,
        pair_lengths=tuple(pair_lengths),
    )


def build_branch_tree(prompt_ids: Sequence[Sequence[int]], branch_ids: Sequence[Sequence[Sequence[int]]], *,
                      position_offset: int = 0) -> TreeBatch:
    """Lay out B prompts with K_b responses each as one tree: [x, y_1, …, y_K] per prompt, the prompt once.

    Each branch y_k continues x's positions and sees x and itself only (role id k + 1; the pair layout is the
    case K = 2 with CHOSEN = 1, REJECTED = 2, so the same masks apply). The scored sequences are ordered prompt by
    prompt, branch by branch (row b's K_b responses in order, as :class:`fastpref.trainer.listwise.ListwiseCollator`
    orders its rows); ``num_pairs`` holds B. K_b may differ between prompts.
    """
    num_prompts = len(prompt_ids)
    if num_prompts == 0:
        raise ValueError("prompt_ids is empty: a tree batch needs at least one prompt")
    _check_token_lists("prompt_ids", prompt_ids, num_prompts)
    if len(branch_ids) != num_prompts:
        raise ValueError(f"branch_ids has {len(branch_ids)} entries, expected one list of responses per prompt")
    for b, branches in enumerate(branch_ids):
        if len(branches) == 0:
            raise ValueError(f"branch_ids[{b}] is empty: every prompt needs at least one response")
        _check_token_lists(f"branch_ids[{b}]", branches, len(branches))
    if position_offset < 0:
        raise ValueError(f"position_offset must be >= 0, got {position_offset}")
    tokens, positions, prompts, roles, rows, labels, counts, pair_lengths = [], [], [], [], [], [], [], []
    max_position = 0
    for b, (x, branches) in enumerate(zip(prompt_ids, branch_ids)):
        a, last_prompt_row = len(x), len(tokens) + len(x) - 1
        tokens += x
        positions += range(position_offset, position_offset + a)
        roles += [PROMPT] * a
        for k, y in enumerate(branches):
            start = len(tokens)
            tokens += y
            positions += range(position_offset + a, position_offset + a + len(y))
            roles += [k + 1] * len(y)
            rows += [last_prompt_row, *range(start, start + len(y) - 1)]  # y[0] from x's last row, y[j] from y[j-1]
            labels += y
            counts.append(len(y))
            max_position = max(max_position, position_offset + a + len(y))
        pair_lengths.append(len(tokens) - len(prompts))
        prompts += [b] * (len(tokens) - len(prompts))
    return TreeBatch(
        input_ids=torch.tensor([tokens], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        pair_ids=torch.tensor(prompts, dtype=torch.long),
        role_ids=torch.tensor(roles, dtype=torch.long),
        row_index=torch.tensor(rows, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        cu_seqlens=torch.nn.functional.pad(torch.tensor(counts, dtype=torch.long).cumsum(0), (1, 0)),
        num_pairs=num_prompts,
        position_offset=position_offset,
        max_position=max_position,
        pair_lengths=tuple(pair_lengths),
    )


def tree_batches_from_features(features: Sequence[dict], *, prefix_ids: Sequence[int] | None = None
                                ) -> tuple[TreeBatch, TreeBatch | None]:
    """The plain tree and (with ``prefix_ids``) the augmented tree of a micro-batch of tokenized pairs.

    ``features``: dicts with ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` and, for the
    augmented tree, ``aug_prompt_input_ids`` (the output of :func:`fastpref.data.tokenize_pair`). The augmented
    tree holds each aug prompt without the shared ``prefix_ids`` (whose keys/values are cached, see
    :mod:`fastpref.model.prefix_kv`), positions offset by its length. Take ``prefix_ids`` once for the whole dataset,
    e.g. :func:`fastpref.data.tokenization.refinement_prefix_ids`, so every micro-batch reuses the same cached prefix.
    """
    prompts = [f["prompt_input_ids"] for f in features]
    chosen = [f["chosen_input_ids"] for f in features]
    rejected = [f["rejected_input_ids"] for f in features]
    tree = build_tree_batch(prompts, chosen, rejected)
    if prefix_ids is None:
        return tree, None
    if any("aug_prompt_input_ids" not in f for f in features):
        raise ValueError("features need 'aug_prompt_input_ids' for the augmented tree (tokenize_pair with "
                         "refinement_prompt)")
    aug_prompts = strip_prefix([f["aug_prompt_input_ids"] for f in features], prefix_ids)
    return tree, build_tree_batch(aug_prompts, chosen, rejected, position_offset=len(prefix_ids))


def _sees_sibling(query_roles: torch.Tensor, key_roles: torch.Tensor) -> torch.Tensor:
    """True where a response row would see another response of its prompt (y_l → y_w; any branch → another)."""
    return (query_roles != PROMPT) & (key_roles != PROMPT) & (query_roles != key_roles)


def _tree_visibility(tree: TreeBatch) -> torch.Tensor:
    """[L, L] bool: query row q may attend to key row k (same pair, causal, no response sees another)."""
    rows = torch.arange(tree.length, device=tree.pair_ids.device)
    same_pair = tree.pair_ids[:, None] == tree.pair_ids[None, :]
    causal = rows[None, :] <= rows[:, None]
    return same_pair & causal & ~_sees_sibling(tree.role_ids[:, None], tree.role_ids[None, :])


def tree_attention_mask(tree: TreeBatch, *, prefix_length: int = 0) -> torch.Tensor:
    """4D boolean mask [1, 1, L, prefix_length + L], True = attend (sdpa's convention).

    The first ``prefix_length`` key columns are a cached shared prefix that every row sees.
    """
    visible = _tree_visibility(tree)
    if prefix_length:
        prefix = torch.ones(tree.length, prefix_length, dtype=torch.bool, device=visible.device)
        visible = torch.cat([prefix, visible], dim=1)
    return visible[None, None]


def tree_additive_mask(tree: TreeBatch, dtype: torch.dtype, *, prefix_length: int = 0) -> torch.Tensor:
    """4D float mask [1, 1, L, prefix_length + L]: 0 where attended, the dtype's minimum elsewhere (eager's)."""
    visible = tree_attention_mask(tree, prefix_length=prefix_length)
    blocked = torch.full(visible.shape, torch.finfo(dtype).min, dtype=dtype, device=visible.device)
    return blocked.masked_fill(visible, 0.0)


def tree_block_mask(tree: TreeBatch, *, prefix_length: int = 0, block_size: int = 128):
    """flex_attention ``BlockMask`` of the same pattern as :func:`tree_attention_mask` (for CUDA).

    Fully masked blocks (other pairs, y_l × y_w) are skipped by the kernel, so the cost is that of the
    visible blocks only.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    pair_ids, role_ids = tree.pair_ids, tree.role_ids

    def tree_mask_mod(batch, head, q_idx, kv_idx):
        key = (kv_idx - prefix_length).clamp(min=0)
        in_prefix = kv_idx < prefix_length
        same_pair = pair_ids[q_idx] == pair_ids[key]
        causal = key <= q_idx
        return in_prefix | (same_pair & causal & ~_sees_sibling(role_ids[q_idx], role_ids[key]))

    return create_block_mask(tree_mask_mod, B=None, H=None, Q_LEN=tree.length, KV_LEN=prefix_length + tree.length,
                             device=pair_ids.device, BLOCK_SIZE=block_size)


def attention_mask_for(model: torch.nn.Module, tree: TreeBatch, *, prefix_length: int = 0):
    """The tree mask in the form ``model``'s attention implementation reads correctly.

    sdpa → 4D boolean; eager → 4D additive float in the model's dtype; flex_attention → ``BlockMask``;
    flash attention → :class:`FlashAttentionTreeError`; anything else → :class:`UnsafeAttentionError`.
    """
    name = attention_implementation(model)
    if name == "sdpa":
        return tree_attention_mask(tree, prefix_length=prefix_length)
    if name == "eager":
        return tree_additive_mask(tree, model.dtype, prefix_length=prefix_length)
    if name == "flex_attention":
        return tree_block_mask(tree, prefix_length=prefix_length)
    if "flash" in name:
        raise FlashAttentionTreeError(
            f"attn_implementation={name!r} cannot express a tree mask (stock flash attention ignores custom 4D "
            "masks); load the model with attn_implementation='sdpa' or 'flex_attention'")
    raise UnsafeAttentionError(f"attn_implementation={name!r} is not known to honour a custom 4D mask; use "
                               "'sdpa', 'eager' or 'flex_attention'")
