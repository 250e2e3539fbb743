"""One round of local training with DeepSpeed ZeRO on this silo's processes.

The engine is rebuilt every round from the received global state: loading new
weights into a live engine is silently undone by the optimizer's fp32 master
copies, and a fresh local optimizer per round is what FedAvg assumes anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedjob import modeling
from fedjob.chunking import State
from fedjob.spec import FederatedJob
from fedjob.textdata import TextCorpus

log = logging.getLogger("fedjob.worker")


def init_distributed(rank: int, world_size: int, master_port: int) -> None:
    """DeepSpeed's CPU (gloo) process group; the env variables stop it from trying MPI discovery."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_SIZE=str(world_size),
        MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        MASTER_PORT=str(master_port),
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if not _has_cuda() else "nccl", verbose=False)
    _unlink_shm_buffer(rank)


def _unlink_shm_buffer(rank: int) -> None:
    """Remove this rank's name for DeepSpeed's CPU shared-memory all-reduce buffer (66 MiB).

    DeepSpeed never unlinks it, so every silo process start left one in /dev/shm
    until the machine (or the pod's shm) filled up. Once every rank has mapped its
    peers' buffers (init returns only then; the barrier makes sure for all ranks),
    the name is not needed: the mappings live on until the process exits.
    """
    import torch.distributed as dist

    dist.barrier()
    where = f"{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}"
    # Missing when this accelerator (GPU) or machine has no shm op.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{where}_{rank}")


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def deepspeed_config(job: FederatedJob, world_size: int) -> dict[str, Any]:
    t = job.spec.training
    ds = t.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_parameters:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": t.batch_size * world_size,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.bf16},
        # We pass a torch optimizer: no FusedAdam / CPU-Adam compilation (75-100 s on CPU).
        "zero_force_ds_cpu_optimizer": False,
        # ZeRO partitions any element-wise optimizer correctly; DeepSpeed only vouches for its own list.
        "zero_allow_untested_optimizer": t.optimizer == "sgd",
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


@dataclass
class RoundResult:
    state: State  # trainable parameters after training (complete on rank 0)
    train_loss: float
    steps: int
    extras: State = field(default_factory=dict)  # tensors the algorithm sends back (SCAFFOLD's c_i)


class LocalTrainer:
    def __init__(self, job: FederatedJob, silo: str, rank: int, world_size: int) -> None:
        self.job = job
        self.silo = silo
        self.rank = rank
        self.world_size = world_size
        self.corpus = TextCorpus.from_folder(job.silo(silo).data.path)
        self.num_samples = self.corpus.num_samples(job.spec.training.sequence_length)
        self.local_steps = job.silo(silo).local_steps or job.spec.training.local_steps

    def manifest_state(self) -> State:
        """The trainable tensors' names and shapes, as the aggregator's global state has them."""
        return modeling.get_state(modeling.build_model(self.job))

    def train(self, round_number: int, global_state: State, extras: State | None = None) -> RoundResult:
        import deepspeed
        import torch
        import torch.distributed as dist

        t = self.job.spec.training
        model = modeling.build_model(self.job)
        modeling.set_state(model, global_state)
        params = [p for _, p in modeling.trainable_parameters(model)]
        optimizer: torch.optim.Optimizer
        if t.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                params, lr=t.learning_rate, momentum=t.momentum, weight_decay=t.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(self.job, self.world_size)
        )
        engine.train()
        # Different windows on every rank, silo and round, reproducible from the job's seed.
        rng = np.random.default_rng([t.seed, round_number, self.rank, *self.silo.encode()])
        losses = []
        adjust = GradientAdjustment.for_job(self.job, global_state, extras or {})
        named = modeling.trainable_parameters(engine.module)
        for _ in range(self.local_steps):
            batch = torch.from_numpy(self.corpus.random_batch(rng, t.batch_size, t.sequence_length)).to(
                engine.device
            )
            loss = engine(input_ids=batch, labels=batch).loss
            losses.append(float(loss.detach()))  # the data loss, comparable across algorithms
            engine.backward(loss)
            if adjust is not None:
                adjust.apply(named)
            engine.step()
        mean = torch.tensor([float(np.mean(losses))], dtype=torch.float64)
        dist.all_reduce(mean)
        state = self._gather_state(engine)
        engine.destroy()
        out = adjust.result(self.local_steps) if adjust is not None else {}
        return RoundResult(state, float(mean.item()) / self.world_size, self.local_steps, out)

    def _gather_state(self, engine: Any) -> State:
        """Full fp32 trainable parameters. Collective under ZeRO-3: every rank must call it."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        out: State = {}
        for name, p in modeling.trainable_parameters(engine.module):
            value = safe_get_full_fp32_param(p)
            if value is None:  # no ZeRO optimizer owns it (stage 0 in fp32)
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    value = p.detach().clone()
            out[name] = value.detach().float().cpu().numpy().copy()
        return out


class GradientAdjustment:
    """What a client-side algorithm adds to each step's gradient, between backward and step.

    FedProx: + mu (w - w_global), the gradient of mu/2 ||w - w_global||^2.
    SCAFFOLD: + (c - c_i); the raw gradients are averaged into the silo's new c_i.
    Working on gradients through DeepSpeed's safe_get/set_full_grad (rather than on the
    loss) is what makes both correct under every ZeRO stage, including ZeRO-3 where
    parameters are partitioned outside forward. Those calls are collective: every rank
    makes them, for every trainable tensor, in the same order.
    """

    def __init__(self, mu: float, anchor: State, correction: State | None) -> None:
        import torch

        self.mu = mu
        self.shapes = {n: v.shape for n, v in anchor.items()}
        self.anchor = {n: torch.from_numpy(v) for n, v in anchor.items()} if mu > 0 else {}
        self.correction = {n: torch.from_numpy(v) for n, v in (correction or {}).items()}
        self.grad_sum = (
            {n: torch.zeros(v.shape, dtype=torch.float64) for n, v in anchor.items()}
            if correction is not None
            else None
        )

    @classmethod
    def for_job(cls, job: FederatedJob, global_state: State, extras: State) -> GradientAdjustment | None:
        from fedjob.aggregation import Scaffold

        agg = job.spec.aggregation
        if agg.algorithm == "fedprox" and agg.proximal_mu > 0:
            return cls(agg.proximal_mu, global_state, None)
        if agg.algorithm == "scaffold":
            p = Scaffold.CORRECTION
            correction = {n: extras[p + n] for n in global_state}
            return cls(0.0, global_state, correction)
        return None

    def apply(self, named: list[tuple[str, Any]]) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_set_full_grad

        for name, p in named:
            grad = safe_get_full_grad(p)
            if grad is None:
                continue
            shape = self.shapes[name]
            raw = grad.detach().float().cpu().reshape(shape)
            if self.grad_sum is not None:
                self.grad_sum[name] += raw
            new = raw
            if self.mu > 0:
                w32 = safe_get_full_fp32_param(p)
                w = (p if w32 is None else w32).detach().float().cpu().reshape(shape)
                new = new + self.mu * (w - self.anchor[name])
            if name in self.correction:
                new = new + self.correction[name].reshape(shape)
            safe_set_full_grad(p, new.reshape(grad.shape).to(dtype=grad.dtype, device=grad.device))

    def result(self, steps: int) -> State:
        """SCAFFOLD's new c_i: the round's mean raw gradient (gradient units, whatever the optimiser)."""
        from fedjob.aggregation import Scaffold

        if self.grad_sum is None:
            return {}
        return {
            Scaffold.VARIATE + n: (g / max(steps, 1)).numpy().astype(np.float32)
            for n, g in self.grad_sum.items()
        }
