"""Multi-process training through accelerate's engines, against the single-process run on the same global batch.

CPU (gloo), all `slow`: DDP and DeepSpeed ZeRO-2/3 (deepspeed: the test extra) launched by ``accelerate
launch`` with the shipped examples/accelerate/*.yaml, Sr-DPO with the cached refinement prefix in the tree and
padded layouts, full fine-tune and LoRA; FSDP2's ``fully_shard`` applied directly (accelerate cannot select
FSDP on CPU: docs/scaling.md) around the fused head and the Sr-DPO loss. Fast: the ZeRO-3 gather of the prefix
pass with a stand-in partitioner. GPU (`gpu`, 2 devices): accelerate's FSDP2 and DeepSpeed ZeRO-2/3 configs.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastpref.data.tiny_models import build_model
from fastpref.model.prefix_kv import compute_prefix_kv

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "accelerate"
COMBOS = ("tree-full", "padded-full", "tree-lora", "padded-lora")
_ENV = {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Runs train_sr_dpo.main for each combo, then builds a second trainer on the same cache directory (no training)
# to see whether it recomputes the reference; counts the reference pairs each rank computed.
_DRIVER = """
import json, os, sys
sys.path.insert(0, {examples!r})
import train_sr_dpo
import fastpref.trainer.trainer as trainer_module
from pathlib import Path

counted = {{"pairs": 0}}
compute = trainer_module.compute_reference_logps
def counting(dataset, collator, batch_size, accelerator, stream_logps, *args, **kwargs):
    def counted_logps(batch, prefix):
        logps = stream_logps(batch, prefix)
        counted["pairs"] += logps.numel() // 2
        return logps
    return compute(dataset, collator, batch_size, accelerator, counted_logps, *args, **kwargs)
trainer_module.compute_reference_logps = counting

# A ZeRO-3 TrainingArguments alive in the process makes transformers build every later model already
# partitioned (deepspeed.zero.Init), before any engine hooks exist; each run here starts from a plain model.
try:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
except ImportError:
    unset_hf_deepspeed_config = lambda: None

# DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce (deepspeed_shm_comm, minutes of CPU) when
# its communication starts, although only inference tensor parallelism calls it (inference_all_reduce); training
# goes through torch.distributed (gloo). Marking the op unavailable (deepspeed.ops keeps the probed dict) skips the
# compile; FASTPREF_TEST_DS_SHM=1 keeps it.
if os.environ.get("DS_ACCELERATOR") and os.environ.get("FASTPREF_TEST_DS_SHM") != "1":
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

out, batch, combos = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
for combo in combos:
    layout, mode = combo.split("-")
    argv = ["--output", str(out / combo), "--batch", batch, "--layout", layout, "--steps", "3",
            "--optim", "sgd", "--lr", "0.5", "--report", str(out / (combo + ".json"))] + (["--lora"] if mode == "lora" else [])
    counted["pairs"] = 0
    unset_hf_deepspeed_config()
    trainer = train_sr_dpo.main(argv)
    first = counted["pairs"]
    unset_hf_deepspeed_config()
    again = train_sr_dpo.build_trainer(train_sr_dpo.parse_args(argv))
    rank = trainer.accelerator.process_index
    (out / f"{{combo}}.rank{{rank}}.json").write_text(json.dumps(
        {{"first_pairs": first, "first_passes": trainer.reference_passes, "again_passes": again.reference_passes,
         "again_pairs": counted["pairs"] - first}}))
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
sys.stdout.flush()
os._exit(0)  # gloo's threads can abort the interpreter's teardown (see test_trainer_runs)
"""


# fully_shard on each decoder layer and the root (2 gloo ranks) or the plain model (1 process); 2 SGD steps of
# Sr-DPO on 8 synthetic pairs: the fused head in the tree stream with grad, the refinement prefix's keys/values
# through the sharded model, the augmented stream after it, preference_loss. Rank 0 saves the first step's full
# gradients and the final full parameters.
_FSDP_DRIVER = """
import json, os, sys
import torch
import torch.distributed as dist
from fastpref import preference_loss
from fastpref.data.tiny_models import build_model
from fastpref.model.prefix_kv import compute_prefix_kv
from fastpref.model.tree_logps import augmented_tree_logps, tree_logps
from fastpref.model.tree_stream import build_tree_batch

VOCAB, PAIRS, STEPS = 300, 8, 2
out = sys.argv[1]
world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")
gen = torch.Generator().manual_seed(1)
def tokens(low, high):
    return torch.randint(3, VOCAB, (int(torch.randint(low, high, (1,), generator=gen)),), generator=gen).tolist()
prefix_ids = tokens(5, 9)
prompts, chosen, rejected = ([tokens(2, 7) for _ in range(PAIRS)] for _ in range(3))
ref = torch.randn(4, PAIRS, generator=gen) * 3 - 40  # ref chosen, ref rejected, aug ref chosen, aug ref rejected
torch.manual_seed(0)
model = build_model("tiny-llama", vocab_size=VOCAB)
if world > 1:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
mine = slice(rank * PAIRS // world, (rank + 1) * PAIRS // world)
losses, grads = [], {{}}
for step in range(STEPS):
    model.train()
    plain = tree_logps(model, build_tree_batch(prompts[mine], chosen[mine], rejected[mine]))
    prefix = compute_prefix_kv(model, prefix_ids)
    aug = augmented_tree_logps(model, build_tree_batch(prompts[mine], chosen[mine], rejected[mine],
                                                       position_offset=len(prefix_ids)), prefix)
    out_loss = preference_loss(plain.chosen_logps, plain.rejected_logps, ref[0, mine], ref[1, mine],
                               loss_type="sr_dpo", aug_chosen_logps=aug.chosen_logps,
                               aug_rejected_logps=aug.rejected_logps, aug_ref_chosen_logps=ref[2, mine],
                               aug_ref_rejected_logps=ref[3, mine])
    optimizer.zero_grad()
    out_loss.loss.backward()
    loss = out_loss.loss.detach().clone()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    losses.append(loss.item())
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    if step == 0:
        grads = {{n: full(p.grad).detach().clone() for n, p in model.named_parameters()}}
    optimizer.step()
params = {{n: full(p.detach()).clone() for n, p in model.named_parameters()}}
if rank == 0:
    torch.save({{"grads": grads, "params": params}}, out + ".pt")
    open(out + ".json", "w").write(json.dumps({{"losses": losses, "world": world}}))
if world > 1:
    dist.barrier()
    dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""


def _params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path.with_suffix(".pt"), weights_only=True)


def _assert_same_parameters(multi: dict, single: dict, combo: str) -> None:
    assert multi.keys() == single.keys(), combo
    for name, value in single.items():
        scale = value.abs().max().item() + 1e-12
        error = (multi[name] - value).abs().max().item()
        assert error <= 1e-6 * scale + 1e-7, f"{combo}: {name} differs by {error:.3g} (scale {scale:.3g})"


def _require_deepspeed() -> None:
    """Skip without deepspeed, except in CI, which installs it with the test extra and must run these tests."""
    if os.environ.get("CI") == "true":
        import deepspeed  # noqa: F401  (an ImportError fails the test)
    else:
        pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory) -> Path:
    """Every combo of COMBOS in one process, 8 pairs a step: the runs the multi-process ones must reproduce."""
    out = tmp_path_factory.mktemp("single")
    script = out / "driver.py"
    script.write_text(_DRIVER.format(examples=str(EXAMPLES)))
    subprocess.run([sys.executable, str(script), str(out), "8", ",".join(COMBOS)], check=True,
                   env={**os.environ, **_ENV}, timeout=400)
    return out


def _launch_combos(tmp_path: Path, config: str, env: dict, port: int) -> Path:
    """``accelerate launch --config_file config`` of the driver over COMBOS with 4 pairs per rank."""
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER.format(examples=str(EXAMPLES)))
    multi = tmp_path / "multi"
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / config),
                    "--main_process_port", str(port), str(script), str(multi), "4", ",".join(COMBOS)],
                   check=True, env={**os.environ, **_ENV, **env}, timeout=400)
    return multi


def _assert_matches_single(multi: Path, single: Path, distributed_type: str) -> None:
    for combo in COMBOS:
        multi_report = json.loads((multi / f"{combo}.json").read_text())
        single_report = json.loads((single / f"{combo}.json").read_text())
        assert multi_report["world"] == 2 and multi_report["distributed_type"] == f"DistributedType.{distributed_type}"
        assert single_report["world"] == 1 and len(multi_report["losses"]) == 3
        assert multi_report["losses"] == pytest.approx(single_report["losses"], rel=1e-6, abs=1e-7), combo
        _assert_same_parameters(_params(multi / f"{combo}.json"), _params(single / f"{combo}.json"), combo)
        files = sorted(p.name.split("-")[:-1] for p in (multi / combo / "ref_cache").glob("*.safetensors"))
        assert files == [["train"], ["train", "aug"]], (combo, files)  # one file per stream
        for rank in (0, 1):
            counts = json.loads((multi / f"{combo}.rank{rank}.json").read_text())
            # 8 pairs, 2 streams, half on each rank; nothing computed again on a cache hit.
            assert counts == {"first_pairs": 8, "first_passes": 2, "again_passes": 0, "again_pairs": 0}, (combo, rank)


@pytest.mark.slow
def test_accelerate_ddp_sr_dpo_matches_single_process(tmp_path, single_runs):
    """2 gloo ranks × 4 pairs = 1 process × 8 pairs for Sr-DPO with the cached refinement prefix: the loss curve
    and every final trainable parameter, in the tree and padded layouts, full fine-tune and LoRA. The reference
    pass is sharded (each rank computes 4 of the 8 pairs per stream), written once (one file per stream) and
    reused by the next trainer. Plain SGD, so a parameter difference is a gradient difference (Adam would hide a
    gradient scaled by the world size, and amplifies float32 noise in near-zero gradients). Catches gradients
    that are not averaged, a prefix cached from one rank's weights or not refreshed after the step, a reference
    pass repeated on every rank or recomputed on a cache hit."""
    _assert_matches_single(_launch_combos(tmp_path, "ddp_cpu.yaml", {}, 29631), single_runs, "MULTI_CPU")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_deepspeed_cpu_matches_single_process(tmp_path, single_runs, stage):
    """DeepSpeed ZeRO-2/3 through accelerate on CPU (DS_ACCELERATOR=cpu, gloo; docs/scaling.md): the DDP test's
    runs and checks. Under ZeRO-3 every parameter is partitioned: the refinement prefix is computed from gathered
    weights, and the no-grad passes must not run in inference mode (DeepSpeed's backward hooks then fail on
    the parameters' inference-tensor data: this test fails so without prefix_kv's no_grad for ZeRO-3)."""
    _require_deepspeed()
    env = {"DS_ACCELERATOR": "cpu", "FASTPREF_DDP_BACKEND": "gloo"}
    multi = _launch_combos(tmp_path, f"deepspeed_zero{stage}.yaml", env, 29633 + stage)
    _assert_matches_single(multi, single_runs, "DEEPSPEED")


@pytest.mark.slow
def test_fully_shard_sr_dpo_step_matches_single_process(tmp_path):
    """FSDP2 (``fully_shard``, gloo, no Trainer: accelerate cannot select FSDP on CPU, docs/scaling.md): 2 ranks × 4
    pairs give the single-process loss, gradients and parameters of 8 pairs. The second step's Δ comes from a
    prefix computed through the sharded model after the update, so a prefix from stale, partial or unsharded-by-
    hand weights, or a fused head reading a shard of lm_head, would show here."""
    env = {**os.environ, **_ENV}
    script = tmp_path / "fsdp_driver.py"
    script.write_text(_FSDP_DRIVER.format())
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                    str(tmp_path / "multi")], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, str(script), str(tmp_path / "single")], check=True, env=env, timeout=300)
    multi, single = (json.loads((tmp_path / f"{run}.json").read_text()) for run in ("multi", "single"))
    assert multi["world"] == 2 and single["world"] == 1 and len(single["losses"]) == 2
    assert multi["losses"] == pytest.approx(single["losses"], rel=1e-6, abs=1e-7)
    assert single["losses"][1] < single["losses"][0]  # the step moved the weights
    multi_state, single_state = (torch.load(tmp_path / f"{run}.pt", weights_only=True) for run in ("multi", "single"))
    for kind in ("grads", "params"):
        _assert_same_parameters(multi_state[kind], single_state[kind], kind)


class _ParamStatus(enum.Enum):
    """The states of ``deepspeed.runtime.zero.partition_parameters.ZeroParamStatus`` the fake uses."""
    AVAILABLE = 1
    NOT_AVAILABLE = 2


class _FakeZero3:
    """Stands in for ``deepspeed``: ``partition`` empties each parameter (keeping its data aside) and tags it with
    ``ds_id`` as ZeRO-3 does; ``zero.GatheredParameters`` restores the data of the parameters it is given for the
    block and records the call. The gather must run outside inference mode: DeepSpeed assigns ``param.data``,
    and inference tensors there would break the optimizer's later in-place updates."""

    def __init__(self):
        self.stash: dict[int, torch.Tensor] = {}
        self.calls: list[int] = []
        self.zero = self

    def partition(self, model: torch.nn.Module) -> None:
        for index, param in enumerate(model.parameters()):
            param.ds_id = index
            param.ds_status = _ParamStatus.NOT_AVAILABLE
            self.stash[index] = param.data
            param.data = torch.empty(0, dtype=param.dtype)

    @contextlib.contextmanager
    def GatheredParameters(self, params, modifier_rank=None):  # noqa: N802 (deepspeed's name)
        assert modifier_rank is None and not torch.is_inference_mode_enabled()
        params = list(params)
        self.calls.append(len(params))
        for param in params:
            param.data, param.ds_status = self.stash[param.ds_id], _ParamStatus.AVAILABLE
        try:
            yield
        finally:
            for param in params:
                param.data, param.ds_status = torch.empty(0, dtype=param.dtype), _ParamStatus.NOT_AVAILABLE


def test_prefix_kv_gathers_zero3_partitioned_weights(monkeypatch):
    """Under ZeRO-3 every parameter is an empty shard outside a gather: the prefix's keys/values are computed with
    all weights gathered (equal to the unpartitioned model's), and the weights are partitioned again after. A
    prefix pass on the bare partitioned module fails on the empty weights."""
    torch.manual_seed(0)
    model = build_model("tiny-llama", vocab_size=97)
    prefix_ids = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = compute_prefix_kv(model, prefix_ids)
    fake = _FakeZero3()
    fake.partition(model)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    got = compute_prefix_kv(model, prefix_ids)
    assert fake.calls == [len(fake.stash)]  # one gather of every partitioned parameter
    assert all(p.numel() == 0 for p in model.parameters())
    for (key, value), (want_key, want_value) in zip(got.key_values, expected.key_values, strict=True):
        torch.testing.assert_close(key, want_key, rtol=0, atol=0)
        torch.testing.assert_close(value, want_value, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed_zero2", "deepspeed_zero3"])
def test_gpu_engines_match_single_process(tmp_path, engine):
    """accelerate's FSDP2 and DeepSpeed ZeRO-2/3 on 2 GPUs × 4 pairs against 1 GPU × 8 pairs: Sr-DPO with the
    cached prefix (gathered/unsharded weights) in the tree layout, full fine-tune and LoRA, losses and final
    parameters; the reference cache written once. Needs 2 CUDA devices (and deepspeed for the ZeRO configs)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    if engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    env = {**os.environ, **_ENV}
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER.format(examples=str(EXAMPLES)))
    combos = ("tree-full", "tree-lora")
    multi, single = tmp_path / "multi", tmp_path / "single"
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(EXAMPLES / f"{engine}.yaml"), "--main_process_port", "29651", str(script), str(multi), "4",
                    ",".join(combos)], check=True, env=env, timeout=600)
    subprocess.run([sys.executable, str(script), str(single), "8", ",".join(combos)], check=True,
                   env={**env, "CUDA_VISIBLE_DEVICES": "0"}, timeout=600)
    for combo in combos:
        multi_report = json.loads((multi / f"{combo}.json").read_text())
        single_report = json.loads((single / f"{combo}.json").read_text())
        expected = "FSDP" if engine == "fsdp2" else "DEEPSPEED"
        assert multi_report["world"] == 2 and multi_report["distributed_type"] == f"DistributedType.{expected}"
        # GPU reductions reorder float32 sums: 1e-5 relative instead of the CPU tests' 1e-6.
        assert multi_report["losses"] == pytest.approx(single_report["losses"], rel=1e-5, abs=1e-6), combo
        multi_params, single_params = _params(multi / f"{combo}.json"), _params(single / f"{combo}.json")
        for name, value in single_params.items():
            error = (multi_params[name] - value).abs().max().item()
            assert error <= 1e-5 * (value.abs().max().item() + 1e-12) + 1e-6, (combo, name, error)
        assert len(list((multi / combo / "ref_cache").glob("*.safetensors"))) == 2, combo


def test_zero3_gathers_nest_and_the_reference_fingerprint_reads_whole_weights(monkeypatch):
    """reference_fingerprint of a ZeRO-3-partitioned model equals the whole model's (a shard's would differ),
    and a prefix pass inside an enclosing gather (the reference precompute's) gathers nothing more and leaves the
    weights whole: an inner gather that freed them would break the rest of the enclosing block."""
    from fastpref.model.prefix_kv import gathered_parameters
    from fastpref.trainer.models import reference_fingerprint
    from fastpref.trainer.ref_store import model_fingerprint

    torch.manual_seed(0)
    model = build_model("tiny-llama", vocab_size=97)
    whole = reference_fingerprint(model, None)
    fake = _FakeZero3()
    fake.partition(model)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    assert model_fingerprint(model) != whole
    assert reference_fingerprint(model, None) == whole
    reference = build_model("tiny-llama", vocab_size=97)
    assert reference_fingerprint(model, reference) == model_fingerprint(reference)
    with gathered_parameters(model):
        compute_prefix_kv(model, [1, 2, 3])
        assert all(p.numel() > 0 for p in model.parameters())
    assert fake.calls == [len(fake.stash)] * 2   # the fingerprint's gather and the enclosing one, nothing nested
    assert all(p.numel() == 0 for p in model.parameters())
