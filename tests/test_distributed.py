"""``process_group``: flooding the loss of the whole data-parallel batch.

Two gloo ranks on CPU each hold a shard of one batch; every rank must return the float64 reference's loss of
the whole batch, and each rank's gradient divided by the world size (what DDP's averaging does) must be the
reference gradient of that loss with respect to its shard. The flood levels are placed between a rank's own
mean and the global mean, so a rank flooding its own shard would step the wrong way: the case fails unless the
sums really cross the group. A group of one rank (every backend of every device, NCCL on GPU) must give what
no group gives.
"""

from __future__ import annotations

import copy
import os
import traceback
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import flood_kernels
from flood_kernels import (FloodedCrossEntropyLoss, LinearFloodedCrossEntropyLoss, flooded_cross_entropy,
                           linear_flooded_cross_entropy)

from helpers import assert_grad_close, assert_loss_close, backend_cases, random_logits, random_target

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
V = 11
FEATURES = 6

# name -> (loss options, rows per rank, how the level is placed, grad_output, entry point)
CASES: Dict[str, Tuple[Dict[str, Any], List[int], str, float, str]] = {
    "batch-mean-between": ({}, [6, 6], "between", 1.0, "function"),
    "batch-mean-between-options": ({"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 6.0,
                                    "reverse_ce": 0.3, "ignore": True}, [5, 7], "between", 1.0, "function"),
    "batch-sum-between": ({"reduction": "sum", "ignore": True}, [6, 6], "between", -2.5, "function"),
    "batch-mean-below": ({"weight": True}, [4, 8], "below", 1.0, "function"),
    "individual-mean-levels": ({"flood": "individual", "weight": True, "ignore": True}, [6, 6], "per-sample",
                               1.0, "function"),
    "individual-sum": ({"flood": "individual", "reduction": "sum"}, [3, 9], "between", 1.0, "function"),
    "none-mean-weights": ({"flood": None, "weight": True, "label_smoothing": 0.2, "ignore": True}, [2, 10], "zero",
                          3.0, "function"),
    "batch-mean-rank-all-ignored": ({"ignore": "rank0"}, [4, 8], "below", 1.0, "function"),
    "module": ({"weight": True}, [6, 6], "between", 1.0, "module"),
    "linear-batch-mean": ({"ignore": True}, [5, 7], "between", 1.0, "linear"),
    "linear-individual-sum": ({"flood": "individual", "reduction": "sum", "weight": True}, [6, 6], "per-sample",
                              0.5, "linear"),
    "linear-module": ({"label_smoothing": 0.1}, [6, 6], "between", 1.0, "linear-module"),
    "compiled": ({"weight": True}, [6, 6], "between", 1.0, "compiled"),
    "probabilities-batch-mean-between": ({"probabilities": True, "weight": True, "label_smoothing": 0.1,
                                          "z_loss": 1e-3}, [5, 7], "between", 1.0, "function"),
    "probabilities-individual-levels": ({"probabilities": True, "flood": "individual", "weight": True}, [4, 8],
                                        "per-sample", 1.0, "module"),
}


def _batch(seed: int, options: Dict[str, Any], rows: List[int]) -> Dict[str, Any]:
    """The whole batch of one case, identical in every rank and in the checking process (same seed)."""
    torch.manual_seed(seed)
    n = sum(rows)
    batch = {"logits": random_logits(n, V, "cpu", scale=2.0), "target": random_target(n, V, "cpu")}
    if options.get("probabilities"):  # class probabilities in place of the indices; "mean" divides by the rows
        batch["target"] = torch.softmax(torch.randn(n, V) * 2.0, dim=1)
    if options.get("ignore") is True:
        batch["target"][torch.randperm(n)[: n // 4]] = -100
    elif options.get("ignore") == "rank0":
        batch["target"][: rows[0]] = -100
    batch["weight"] = torch.rand(V) + 0.5 if options.get("weight") else None
    batch["levels"] = torch.rand(n) * 3.0
    batch["hidden"] = torch.randn(n, FEATURES)
    batch["linear_weight"] = torch.randn(V, FEATURES)
    batch["linear_bias"] = torch.randn(V)
    return batch


def _logits(batch: Dict[str, Any], entry: str) -> torch.Tensor:
    """The case's float32 logits: the batch's own, or ``F.linear`` of its hidden states for the linear entries."""
    if "linear" in entry:
        return F.linear(batch["hidden"], batch["linear_weight"], batch["linear_bias"])
    return batch["logits"]


def _loss_options(options: Dict[str, Any], batch: Dict[str, Any], float64: bool = False) -> Dict[str, Any]:
    """The case's loss options, with the batch's class weights (in float64 for the reference)."""
    kwargs = {k: v for k, v in options.items() if k not in ("weight", "ignore", "probabilities")}
    if batch["weight"] is not None:
        kwargs["weight"] = batch["weight"].double() if float64 else batch["weight"]
    return kwargs


def _raw_loss(batch: Dict[str, Any], options: Dict[str, Any], entry: str, rows: slice = slice(None)) -> float:
    """The float64 reference's unflooded loss of ``rows`` of the batch alone (by default the whole batch)."""
    kwargs = dict(_loss_options(options, batch, float64=True), flood=None)
    return float(flooded_cross_entropy(_logits(batch, entry)[rows].double(), batch["target"][rows],
                                       backend="reference", **kwargs))


def _flood_level(batch: Dict[str, Any], options: Dict[str, Any], rows: List[int], placement: str,
                 entry: str) -> Any:
    """The level of a case. "between": halfway between rank 0's own raw loss and the global one, so that flooding
    rank 0's shard alone takes the wrong side of b; "below": half the global raw loss."""
    if placement == "zero":
        return 0.0
    if placement == "per-sample":
        return batch["levels"]
    whole = _raw_loss(batch, options, entry)
    if placement == "below":
        return whole * 0.5
    return 0.5 * (whole + _raw_loss(batch, options, entry, slice(0, rows[0])))


def _shard(value: Any, rows: List[int], rank: int) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    start = sum(rows[:rank])
    return value[start:start + rows[rank]]


def _run_case(name: str, seed: int, backend: str, rank: int, group: Any) -> Dict[str, Any]:
    options, rows, placement, grad_output, entry = CASES[name]
    batch = _batch(seed, options, rows)
    logits = _logits(batch, entry)
    kwargs = _loss_options(options, batch)
    kwargs["flood_level"] = _shard(_flood_level(batch, options, rows, placement, entry), rows, rank)
    target = _shard(batch["target"], rows, rank)
    if "linear" in entry:
        h = _shard(batch["hidden"], rows, rank).clone().requires_grad_(True)
        w = batch["linear_weight"].clone().requires_grad_(True)
        b = batch["linear_bias"].clone().requires_grad_(True)
        if entry == "linear":
            loss, raw = linear_flooded_cross_entropy(h, w, target, linear_bias=b, chunk_size=4, backend=backend,
                                                     return_raw=True, process_group=group, **kwargs)
        else:
            module = LinearFloodedCrossEntropyLoss(chunk_size=4, backend=backend, process_group=group, **kwargs)
            loss = module(h, w, target, b)
            raw = module.last_raw_loss
        (loss * grad_output).backward()
        return {"loss": loss.detach(), "raw": raw, "grads": (h.grad, w.grad, b.grad)}
    x = _shard(logits, rows, rank).clone().requires_grad_(True)
    if entry == "module":
        module = FloodedCrossEntropyLoss(backend=backend, process_group=group, **kwargs)
        loss = module(x, target)
        raw = module.last_raw_loss
    elif entry == "compiled":
        compiled = torch.compile(flooded_cross_entropy, fullgraph=True, backend="aot_eager")
        loss, raw = compiled(x, target, backend=backend, return_raw=True, process_group=group, **kwargs)
    else:
        loss, raw = flooded_cross_entropy(x, target, backend=backend, return_raw=True, process_group=group, **kwargs)
    (loss * grad_output).backward()
    return {"loss": loss.detach(), "raw": raw, "grads": (x.grad,)}


def _cases_for(backend: str) -> List[str]:
    """Every case on the C++ CPU backend and the reference; a few on Triton's interpreter (slow)."""
    if backend == "triton":
        return ["batch-mean-between-options", "individual-mean-levels", "linear-batch-mean"]
    return list(CASES)


def _cpu_backends() -> List[str]:
    return flood_kernels.available_backends("cpu")


def _rank_main(rank: int, seed: int, out_dir: str) -> None:
    init_method = "file://" + os.path.join(out_dir, "rendezvous")  # a file, not a port: nothing to collide with
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    results: Dict[str, Any] = {}
    try:
        for backend in _cpu_backends():
            for name in _cases_for(backend):
                try:
                    results[f"{backend}/{name}"] = _run_case(name, seed, backend, rank, dist.group.WORLD)
                except Exception:  # reported by the test of that case, in the checking process
                    results[f"{backend}/{name}"] = {"error": traceback.format_exc()}
        try:
            flooded_cross_entropy(torch.randn(4, V), torch.randint(0, V, (4,)), flood="individual",
                                  reduction="none", process_group=dist.group.WORLD)
            results["reduction-none"] = {"error": None}
        except ValueError as error:
            results["reduction-none"] = {"error": str(error)}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def group_results(tmp_path_factory) -> Tuple[int, List[Dict[str, Any]]]:
    """Run every case once in two gloo ranks; ``(seed, [rank 0's results, rank 1's])``."""
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    mp.spawn(_rank_main, args=(seed, out_dir), nprocs=WORLD, join=True)
    return seed, [torch.load(os.path.join(out_dir, f"rank{rank}.pt")) for rank in range(WORLD)]


def _reference(name: str, seed: int) -> Dict[str, Any]:
    """The float64 reference on the whole batch, without any process group."""
    options, rows, placement, grad_output, entry = CASES[name]
    batch = _batch(seed, options, rows)
    kwargs = _loss_options(options, batch, float64=True)
    if "linear" in entry:
        h, w, b = (batch[k].double().requires_grad_(True) for k in ("hidden", "linear_weight", "linear_bias"))
        logits = F.linear(h, w, b)
        leaves = (h, w, b)
    else:
        logits = batch["logits"].double().requires_grad_(True)
        leaves = (logits,)
    level = _flood_level(batch, options, rows, placement, entry)
    kwargs["flood_level"] = level.double() if isinstance(level, torch.Tensor) else level
    loss, raw = flooded_cross_entropy(logits, batch["target"], backend="reference", return_raw=True, **kwargs)
    (loss * grad_output).backward()
    return {"loss": loss.detach(), "raw": raw, "grads": tuple(leaf.grad for leaf in leaves), "level": level,
            "shard_raw": _raw_loss(batch, options, entry, slice(0, rows[0]))}


CASE_PARAMS = [pytest.param(backend, name, id=f"{backend}-{name}") for backend in _cpu_backends()
               for name in _cases_for(backend)]


@pytest.mark.parametrize("backend,name", CASE_PARAMS)
def test_group_floods_the_global_batch(group_results, backend, name):
    seed, ranks = group_results
    expected = _reference(name, seed)
    options, _, placement, _, entry = CASES[name]
    if placement == "between" and options.get("flood", "batch") == "batch":
        # The premise: flooding that shard alone would take the other side of b than the whole batch does.
        level = expected["level"]
        assert (float(expected["raw"]) - level) * (expected["shard_raw"] - level) < 0
    for rank, results in enumerate(ranks):
        result = results[f"{backend}/{name}"]
        assert "error" not in result, result.get("error")
        assert_loss_close(result["loss"], expected["loss"].float())
        assert_loss_close(result["raw"], expected["raw"].float())
    if "linear" in entry:
        # grad_input: each rank's rows; grad_W, grad_b: what DDP's averaging over the ranks leaves.
        grad_h = torch.cat([results[f"{backend}/{name}"]["grads"][0] for results in ranks]) / WORLD
        assert_grad_close(grad_h, expected["grads"][0], torch.float32)
        for i in (1, 2):
            averaged = sum(results[f"{backend}/{name}"]["grads"][i] for results in ranks) / WORLD
            assert_grad_close(averaged, expected["grads"][i], torch.float32)
    else:
        grad = torch.cat([results[f"{backend}/{name}"]["grads"][0] for results in ranks]) / WORLD
        assert_grad_close(grad, expected["grads"][0], torch.float32)


def test_reduction_none_with_a_group_raises(group_results):
    _, ranks = group_results
    for results in ranks:
        assert results["reduction-none"]["error"] is not None
        assert "process_group" in results["reduction-none"]["error"]


@pytest.mark.parametrize("group", ["world", 1, object()])
def test_process_group_must_be_a_process_group(group):
    with pytest.raises(TypeError, match="process_group"):
        flooded_cross_entropy(torch.randn(4, V), torch.randint(0, V, (4,)), process_group=group)
    with pytest.raises(TypeError, match="process_group"):
        linear_flooded_cross_entropy(torch.randn(4, FEATURES), torch.randn(V, FEATURES), torch.randint(0, V, (4,)),
                                     process_group=group)


@pytest.fixture(scope="module")
def group_of_one():
    """A one-rank default group in this process (gloo for CPU tensors, NCCL for CUDA ones), torn down after."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("device,backend", backend_cases(with_reference=True))
@pytest.mark.parametrize("flood,reduction", [("batch", "mean"), ("individual", "sum"), (None, "mean")])
def test_group_of_one_rank_changes_nothing(group_of_one, device, backend, flood, reduction):
    x = random_logits(9, 37, device)
    target = random_target(9, 37, device, ignore_fraction=0.2)
    weight = (torch.rand(37) + 0.5).to(device)
    level = 1.5 if flood != "individual" else (torch.rand(9) * 3).to(device)
    results = []
    for group in (None, group_of_one):
        leaf = x.clone().requires_grad_(True)
        loss, raw = flooded_cross_entropy(leaf, target, flood=flood, reduction=reduction, weight=weight,
                                          flood_level=level, backend=backend, return_raw=True, process_group=group)
        (loss * 2.0).backward()
        results.append((loss.detach(), raw, leaf.grad))
    for without, with_group in zip(*results):
        torch.testing.assert_close(with_group, without, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("module_class", [FloodedCrossEntropyLoss, LinearFloodedCrossEntropyLoss])
def test_deepcopy_of_a_module_shares_its_group(group_of_one, module_class):
    """A model that owns the loss can be deep-copied (EMA, SWA): the copy shares the communicator, copies the rest."""
    weight = torch.rand(V) + 0.5
    module = module_class(flood_level=torch.tensor(0.7), weight=weight, process_group=group_of_one)
    clone = copy.deepcopy(module)
    assert clone.process_group is group_of_one
    assert clone.weight is not module.weight and torch.equal(clone.weight, weight)
    assert clone.flood_level is not module.flood_level and float(clone.flood_level) == pytest.approx(0.7)
    args = ((torch.randn(5, FEATURES), torch.randn(V, FEATURES)) if module_class is LinearFloodedCrossEntropyLoss
            else (torch.randn(5, V),))
    target = torch.randint(0, V, (5,))
    torch.testing.assert_close(clone(*args, target), module(*args, target))
    assert copy.deepcopy(module_class()).process_group is None
